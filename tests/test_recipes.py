"""The training recipes: one diffusion recipe for the command, the tour and tutorial 7, whose
parameter average is what is evaluated and left in the model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import freqvi
from freqvi.cli import build_parser, diffusion_recipe, main, vae_recipe
from freqvi.datasets import load_moons
from freqvi.infer import recipes
from freqvi.infer.recipes import DIFFUSION, VAE, Recipe
from freqvi.tour import BUDGETS, diffusion_stage

TUTORIAL = Path(__file__).resolve().parent.parent / "tutorials" / "07_diffusion.ipynb"
#: what a caller sets per run, beside the recipe
PER_RUN = ("num_steps", "seed", "progress")


class _Stop(Exception):
    """Ends a run at its fit call, once the call's options are recorded."""


def _recorded(monkeypatch, run) -> dict:
    """The options ``run()`` hands to :func:`freqvi.fit` through a recipe, the fit itself not run."""
    calls = []

    def record(model, data, guide=None, **options):
        calls.append(options)
        raise _Stop

    monkeypatch.setattr(recipes, "fit", record)
    with pytest.raises(_Stop):
        run()
    (options,) = calls
    return options


def test_the_commands_defaults_are_the_diffusion_recipe():
    args = build_parser().parse_args(["diffusion"])
    assert diffusion_recipe(args) == DIFFUSION


def test_the_tour_and_the_command_fit_diffusion_with_the_same_options(tmp_path, monkeypatch):
    command = _recorded(monkeypatch, lambda: main(["diffusion", "--quiet", "--out", str(tmp_path / "cli")]))
    tour = _recorded(monkeypatch, lambda: diffusion_stage(tmp_path, BUDGETS["full"], seed=0, progress=False))
    expected = {k: v for k, v in DIFFUSION.options(len(load_moons("train"))).items() if k not in PER_RUN}
    for options in (command, tour):
        assert {k: v for k, v in options.items() if k not in PER_RUN} == expected
    assert command["num_steps"] == DIFFUSION.num_steps
    assert tour["num_steps"] >= DIFFUSION.num_steps  # the full tour trains at least as long


def test_the_command_overrides_one_field_and_keeps_the_rest():
    args = build_parser().parse_args(["diffusion", "--lr", "1e-3", "--ema-decay", "0.99",
                                      "--estimator", "simple"])
    average = replace(DIFFUSION.average, decay=0.99)
    expected = replace(DIFFUSION, lr=1e-3, average=average, loss="simple", loss_options=())
    assert diffusion_recipe(args) == expected
    assert diffusion_recipe(build_parser().parse_args(["diffusion", "--ema-decay", "0"])).average is None


def test_tutorial_7_fits_its_moons_with_the_recipe():
    cells = json.loads(TUTORIAL.read_text())["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    assert "from freqvi.infer.recipes import DIFFUSION" in code and "DIFFUSION.fit(" in code


def _hand_ema(start: list[np.ndarray], iterates: list[list[np.ndarray]], decay: float) -> list[np.ndarray]:
    """The warmed-up EMA in float64: d_k = min(d, (1 + k) / (10 + k)) at the k-th update (k from 0)."""
    average = [a.astype(np.float64) for a in start]
    for k, iterate in enumerate(iterates):
        d = min(decay, (1 + k) / (10 + k))
        average = [d * a + (1 - d) * x for a, x in zip(average, iterate, strict=True)]
    return average


def test_the_commands_average_is_what_it_evaluates_and_leaves(tmp_path, monkeypatch):
    """The bound and the samples of ``freqvi diffusion`` come from the recipe's EMA, not the last iterate."""
    assert isinstance(DIFFUSION.average, freqvi.EMA) and DIFFUSION.average.warmup
    start, iterates, evaluated, last = [], [], [], []
    real_fit, real_bound = recipes.fit, freqvi.cli.diffusion_bound

    def fit_recording_iterates(model, data, guide=None, **options):
        start.extend(p.detach().numpy().copy() for p in model.parameters())

        def keep(result):
            iterates.append([p.detach().numpy().copy() for p in model.parameters()])

        result = real_fit(model, data, guide, on_step=keep, **options)
        last.extend(p.detach().numpy().copy() for p in model.parameters())
        return result

    def bound_recording_parameters(model, test, **options):
        evaluated.extend(p.detach().numpy().copy() for p in model.parameters())
        return real_bound(model, test, **options)

    monkeypatch.setattr(recipes, "fit", fit_recording_iterates)
    monkeypatch.setattr(freqvi.cli, "diffusion_bound", bound_recording_parameters)
    quick = ["diffusion", "--quiet", "--steps", "30", "--diffusion-steps", "20", "--hidden", "16",
             "--samples", "100", "--out", str(tmp_path / "out")]
    assert main(quick) == 0
    expected = _hand_ema(start, iterates, DIFFUSION.average.decay)
    assert len(iterates) == 30
    for got, left, want in zip(evaluated, last, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # float32 parameters
        np.testing.assert_array_equal(left, got)
    # the average is not the last iterate, so the test tells them apart
    assert not all(np.allclose(w, raw, rtol=1e-3) for w, raw in zip(expected, iterates[-1], strict=True))


def test_a_recipe_caps_its_batch_at_the_datas_rows():
    recipe = Recipe(loss="trace", lr=0.1, batch_size=256, num_steps=3, average=None)
    assert recipe.options(10)["batch_size"] == 10 and recipe.options()["batch_size"] == 256
    x = torch.randn(10, 2)
    torch.manual_seed(0)
    model = freqvi.models.GaussianDiffusion(2, 5, hidden=(4,))
    assert recipe.fit(model, x, progress=False).num_steps == 3


def test_the_vae_commands_defaults_are_the_vae_recipe():
    assert vae_recipe(build_parser().parse_args(["vae"])) == VAE


def test_the_vae_command_averages_on_request_and_refuses_a_bad_decay(tmp_path, monkeypatch, capsys):
    argv = ["vae", "--quiet", "--ema-decay", "0.99", "--estimator", "iwae", "--out", str(tmp_path / "ok")]
    options = _recorded(monkeypatch, lambda: main(argv))
    assert options["average"] == freqvi.EMA(0.99) and options["num_particles"] == 10
    assert options["validation_data"] is not None and options["patience"] == 5  # early stopping kept
    assert main(["vae", "--quiet", "--ema-decay", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "argument --ema-decay: expected a finite number >= 0 and < 1; got '1'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work

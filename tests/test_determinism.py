"""The same seed gives the same result, bit for bit on CPU, in every driver and the console command."""

import re

import pytest
import torch
from simulate import factor_data, mixture_data

import freqvi
from freqvi.cli import main
from freqvi.models import FactorAnalysis, GaussianMixture


def estimates_after(fit_once):
    model = fit_once()
    return {k: v.clone() for k, v in model.estimates().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def em_mixture():
    gm = GaussianMixture(3, 2)  # k-means++ initialisation draws from the seeded generators
    freqvi.em(gm, mixture_data(n=200), max_iter=20, tol=0.0, seed=11, progress=False)
    return gm


def online_em_mixture():
    gm = GaussianMixture(3, 2)
    freqvi.em(gm, mixture_data(n=200), batch_size=50, max_iter=5, tol=0.0, seed=11, progress=False)
    return gm


def variational_fit():
    fa = FactorAnalysis(5, 2)
    freqvi.fit(fa.model, factor_data(n=80), fa.mean_field_guide(), loss="iwae", num_particles=4,
               batch_size=20, num_steps=30, seed=11, progress=False)
    return fa


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_em_fit_and_online_em_repeat_exactly():
    for fit_once in (em_mixture, online_em_mixture, variational_fit):
        assert same(estimates_after(fit_once), estimates_after(fit_once)), fit_once.__name__


def test_the_console_command_repeats_exactly(capsys):
    outputs = []
    for _ in range(2):
        assert main(["--quiet", "--seed", "3", "--components", "2"]) == 0
        outputs.append(re.sub(r"wall time .*", "", capsys.readouterr().out))
    assert outputs[0] == outputs[1]

"""Diffusion quality over seeds at one CPU budget: freqvi with and without averaging, and a plain DDPM loop.

The benchmark of issue 21. On two 2-D data sets, :func:`freqvi.datasets.load_moons` and a
mixture of eight well-separated Gaussians (:func:`gaussian_ring`, centres on a circle of radius
2, standard deviation 0.15), each seed trains a :class:`~freqvi.models.GaussianDiffusion`
(T = 1000, linear schedule, default :class:`~freqvi.models.TimeMLP`, one thread) for ``--budget``
CPU seconds in two ways, from the same initial weights:

* ``freqvi``: the recipe of ``freqvi diffusion``, the tour and tutorial 7,
  :data:`freqvi.infer.recipes.DIFFUSION` (its estimator, time sampling, average, learning rate and
  batch size), stopped by ``max_cpu_time`` instead of its step count. Rows ``freqvi-avg`` (the
  average fit leaves) and ``freqvi-raw`` (the last iterate of the same run, copied by a callback):
  a paired comparison of the two at one trajectory;
* ``torch-ema``: a DDPM loop written here (Ho et al. 2020, algorithm 1: ``t ~ U{1..T}``, loss
  ``mean ||eps - eps_theta(x_t, t)||^2``), batch 256, Adam ``lr=2e-3``, with the usual EMA of the
  weights (:class:`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn(0.999)``), run
  until its process CPU time reaches the budget.

Each model is measured on the 2,000 test points: the energy distance
(:func:`freqvi.infer.diffusion.energy_distance`) between 1,000 ancestral samples and 1,000 test
points over the same distance between the test set's two halves (the noise floor), averaged over
``--sample-draws`` independent sets of samples (default 10), and the held-out NLL bound
(:func:`freqvi.infer.diffusion.diffusion_bound`, every t) in nats per dimension. One set of 1,000
samples measures a model's energy distance poorly: for one fitted ring model, ten sets gave
ED/floor from 0.36 to 1.63 (s.d. 0.46), as wide as the differences between the methods, so the
worst of five seeds read off single sets ranked noise; the mean of ten has a tenth of that variance
and the same expectation (each set is compared with the same 1,000 test points the floor uses).
It prints a row per seed (with the standard error of the mean over the sets) and the median and
worst of each measure.

Run ``python benchmarks/diffusion_seeds.py`` (about 5 x 2 x 2 budgets plus evaluations: an hour
at the default 90 s; one process per data set, ``--data moons`` and ``--data gaussians``, halves
it on two cores), or ``--budget 5 --seeds 1 --sample-draws 2`` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from freqvi.datasets import load_moons
from freqvi.infer.diffusion import diffusion_bound, energy_distance
from freqvi.infer.recipes import DIFFUSION
from freqvi.models import GaussianDiffusion

BATCH_SIZE, LR, DECAY, NUM_SAMPLES = 256, 2e-3, 0.999, 1000  # the loop's settings; the samples drawn


def gaussian_ring(split: str, n: int = 2000) -> torch.Tensor:
    """``n`` points of an equal mixture of 8 Gaussians (s.d. 0.15) centred on a circle of radius 2."""
    gen = torch.Generator().manual_seed({"train": 0, "test": 1}[split])
    angle = 2 * math.pi * torch.randint(8, (n,), generator=gen) / 8
    centres = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + 0.15 * torch.randn(n, 2, generator=gen)


DATA = {"moons": load_moons, "gaussians": gaussian_ring}


def new_model(seed: int) -> GaussianDiffusion:
    torch.manual_seed(seed)
    return GaussianDiffusion(2, 1000)


def freqvi_rows(x: torch.Tensor, seed: int, budget: float) -> dict[str, GaussianDiffusion]:
    """The average left by the recipe's fit and the last iterate of the same run, as two models."""
    pyro.clear_param_store()
    model = new_model(seed)
    raw: dict[str, torch.Tensor] = {}

    def keep_iterate(result) -> None:  # the raw parameters after each step, before fit leaves the average
        for name, p in model.named_parameters():
            raw.setdefault(name, torch.empty_like(p)).copy_(p.detach())

    result = DIFFUSION.fit(model, x, num_steps=10**9, max_cpu_time=budget, seed=seed, progress=False,
                           on_step=keep_iterate)
    last = new_model(seed)
    last.load_state_dict(raw, strict=False)
    print(f"  seed {seed}  freqvi: {result.num_steps} steps", flush=True)
    return {"freqvi-avg": model, "freqvi-raw": last}


def torch_row(x: torch.Tensor, seed: int, budget: float) -> GaussianDiffusion:
    """The EMA of a plain DDPM loop trained for ``budget`` CPU seconds, in a GaussianDiffusion."""
    pyro.clear_param_store()
    model = new_model(seed)
    net, abar = model.denoiser, model.schedule.table(x.dtype).alphas_cumprod
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    torch.manual_seed(seed)
    start = time.process_time()
    batches = (rows for _ in iter(int, 1) for rows in torch.randperm(len(x)).split(BATCH_SIZE))  # epochs
    while time.process_time() - start < budget:
        ddpm_step(net, abar, optimizer, ema, x[next(batches)])
    print(f"  seed {seed}  torch:  {int(ema.n_averaged)} steps", flush=True)
    with torch.no_grad():
        for p, q in zip(net.parameters(), ema.module.parameters(), strict=True):
            p.copy_(q)
    return model


def ddpm_step(net, abar: torch.Tensor, optimizer, ema: AveragedModel, x0: torch.Tensor) -> None:
    """One step of the DDPM loop on the rows ``x0``: ``t ~ U{1..T}``, the noise-prediction loss, Adam, EMA."""
    eps = torch.randn_like(x0)
    t = torch.randint(1, len(abar), (len(x0),))
    a = abar[t].unsqueeze(-1)
    loss = (eps - net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.update_parameters(net)


def measure(model: GaussianDiffusion, test: torch.Tensor, floor: float, seed: int,
            draws: int) -> tuple[float, float, float]:
    """(energy distance over its floor, the mean over ``draws`` sets of samples; its standard error;
    held-out NLL bound in nats per dimension)."""
    reference = test[:NUM_SAMPLES]
    ratios = torch.tensor([energy_distance(model.sample(NUM_SAMPLES, seed=1000 * seed + j), reference) / floor
                           for j in range(draws)])
    error = float(ratios.std() / math.sqrt(draws)) if draws > 1 else math.nan
    return float(ratios.mean()), error, diffusion_bound(model, test, seed=seed).nats_per_dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=90.0, help="CPU seconds of training per model")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", choices=tuple(DATA), nargs="+", default=list(DATA))
    parser.add_argument("--sample-draws", type=int, default=10,
                        help="sets of 1,000 samples whose energy distances are averaged per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.data:
        train, test = DATA[name]("train"), DATA[name]("test")
        floor = energy_distance(test[NUM_SAMPLES:2 * NUM_SAMPLES], test[:NUM_SAMPLES])
        results: dict[str, list[tuple[float, float, float]]] = {}
        print(f"{name}: {args.budget:.0f} CPU s per model; energy distance over floor ({floor:.4f}), "
              "NLL bound in nats/dim")
        for seed in range(args.seeds):
            models = freqvi_rows(train, seed, args.budget)
            models["torch-ema"] = torch_row(train, seed, args.budget)
            for row, model in models.items():
                results.setdefault(row, []).append(measure(model, test, floor, seed, args.sample_draws))
                ratio, error, nll = results[row][-1]
                print(f"  seed {seed}  {row:<11} ED/floor {ratio:6.2f} (s.e. {error:.2f})  NLL {nll:.4f}",
                      flush=True)
        for row, values in results.items():
            ratios, _, nlls = zip(*values, strict=True)
            print(f"  {row:<11} ED/floor median {statistics.median(ratios):.2f} worst {max(ratios):.2f}; "
                  f"NLL median {statistics.median(nlls):.4f} worst {max(nlls):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

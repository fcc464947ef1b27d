"""The CPU cost of a diffusion recipe step: freqvi.fit, its estimator by hand, and the DDPM loop of issue 21.

What it measures: CPU seconds per step (:func:`time.process_time`, one thread) on moons with the
model of ``benchmarks/diffusion_seeds.py`` (:class:`~freqvi.models.GaussianDiffusion`, T = 1000,
default :class:`~freqvi.models.TimeMLP`), every row from the same initial weights:

* ``fit``: :data:`freqvi.infer.recipes.DIFFUSION` (time-subsampled ELBO with importance-sampled
  ``t``, Adam ``2e-3``, EMA), through :func:`freqvi.fit` (``FitResult.cpu_time``: the loop only);
* ``by-hand``: the same estimator, optimiser and EMA in a plain loop (the minibatch through
  :class:`~freqvi.handlers.SubsamplePlate`, Pyro's validation off as in fit's loop): what fit adds
  (its step guard, bookkeeping, callbacks and clocks) is ``fit / by-hand``;
* ``torch``: the DDPM loop of ``diffusion_seeds.py`` (noise-prediction loss, uniform ``t``, EMA):
  what the estimator adds over the plain loss is ``by-hand / torch``.

The rows run interleaved, ``--repeats`` times, at each batch size (the recipe's 512 and the loop's
256); each ratio is the median of the per-repeat ratios. Also printed: the CPU seconds fit spends
before its loop (checking the pair runs the T-step chain on one minibatch).

Run ``python benchmarks/diffusion_fit_overhead.py`` (a few minutes), or ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from diffusion_seeds import ddpm_step
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from freqvi.datasets import load_moons
from freqvi.estimators import get_estimator
from freqvi.handlers import SubsamplePlate
from freqvi.infer.recipes import DIFFUSION
from freqvi.models import GaussianDiffusion

LOOP_DECAY = 0.999  # the DDPM loop's EMA decay in diffusion_seeds.py


def new_model() -> GaussianDiffusion:
    pyro.clear_param_store()
    torch.manual_seed(0)
    return GaussianDiffusion(2, 1000)


def epochs(n: int, batch_size: int):
    """Row indices of successive minibatches, epochs of a random permutation."""
    return (rows for _ in iter(int, 1) for rows in torch.randperm(n).split(batch_size))


def fit_row(x: torch.Tensor, steps: int, batch_size: int) -> tuple[float, float]:
    """(CPU s per step of fit's loop, CPU s fit spent outside it)."""
    model = new_model()
    start = time.process_time()
    result = DIFFUSION.fit(model, x, num_steps=steps, batch_size=batch_size, seed=0, progress=False)
    return result.cpu_time / result.num_steps, time.process_time() - start - result.cpu_time


def by_hand_row(x: torch.Tensor, steps: int, batch_size: int) -> float:
    """CPU s per step of the recipe's estimator, Adam and EMA in a plain loop."""
    model = new_model()
    pair = (model.model, model.guide)
    elbo = get_estimator(DIFFUSION.loss, **dict(DIFFUSION.loss_options))
    optimizer = torch.optim.Adam(model.denoiser.parameters(), lr=DIFFUSION.lr)
    ema = AveragedModel(model.denoiser, multi_avg_fn=get_ema_multi_avg_fn(DIFFUSION.average.decay))
    batches = epochs(len(x), batch_size)
    with pyro.validation_enabled(False):
        start = time.process_time()
        for _ in range(steps):
            with SubsamplePlate(model.data_plate, next(batches)):
                loss = elbo.differentiable_loss(*pair, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update_parameters(model.denoiser)
        return (time.process_time() - start) / steps


def torch_row(x: torch.Tensor, steps: int, batch_size: int) -> float:
    """CPU s per step of the DDPM loop of ``diffusion_seeds.py``."""
    model = new_model()
    net, abar = model.denoiser, model.schedule.table(x.dtype).alphas_cumprod
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(LOOP_DECAY))
    optimizer = torch.optim.Adam(net.parameters(), lr=DIFFUSION.lr)
    batches = epochs(len(x), batch_size)
    start = time.process_time()
    for _ in range(steps):
        ddpm_step(net, abar, optimizer, ema, x[next(batches)])
    return (time.process_time() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per row and repeat")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every row")
    parser.add_argument("--quick", action="store_true", help="20 steps, one repeat: a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, repeats = (20, 1) if args.quick else (args.steps, args.repeats)
    x = load_moons("train")
    print(f"moons, T = 1000, {steps} steps x {repeats} repeats, CPU ms per step (medians)")
    for batch_size in (DIFFUSION.batch_size, 256):
        fit, before, hand, loop = [], [], [], []
        for _ in range(repeats):
            per_step, outside = fit_row(x, steps, batch_size)
            fit.append(per_step)
            before.append(outside)
            hand.append(by_hand_row(x, steps, batch_size))
            loop.append(torch_row(x, steps, batch_size))

        def ratio(a: list[float], b: list[float]) -> float:
            return statistics.median(u / v for u, v in zip(a, b, strict=True))

        rows = (("fit", fit), ("by-hand", hand), ("torch", loop))
        ms = {name: 1e3 * statistics.median(v) for name, v in rows}
        print(f"batch {batch_size}: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
              + f"; fit/torch {ratio(fit, loop):.3f}, fit/by-hand {ratio(fit, hand):.3f}, "
              f"by-hand/torch {ratio(hand, loop):.3f}; fit's checks before its loop "
              f"{statistics.median(before):.2f} CPU s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

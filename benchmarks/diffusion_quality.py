"""A diffusion model on two moons after a fixed CPU budget: sample quality and the likelihood bound.

The acceptance check of issue 5. :class:`~freqvi.models.GaussianDiffusion` (T = 1000, linear
schedule, default :class:`~freqvi.models.TimeMLP`) is fitted on :func:`freqvi.datasets.load_moons`'s
2,000 training points by :func:`freqvi.fit` (batch 256, Adam) for the steps that fit into
``--budget`` seconds (one thread; the rate from the training loop of a 200-step trial fit, which
excludes the one-time check of the pair that runs the whole chain once on one minibatch), then measured on
the 2,000 test points:

* energy distance (:func:`freqvi.infer.diffusion.energy_distance`) between 1,000 ancestral
  samples and the first 1,000 test points, against the same distance between the two halves
  of the test split (the noise floor). Target: at most 2 times the floor;
* the held-out NLL bound (:func:`freqvi.infer.diffusion.diffusion_bound`, the full sum over t)
  in nats per dimension, against the exact held-out NLL of a 2-D Gaussian fitted by maximum
  likelihood to the training points. Target: lower.

Run ``python benchmarks/diffusion_quality.py`` (``--estimator simple`` trains on Ho's
noise-prediction loss instead of the ELBO).
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import torch

import freqvi
from freqvi.datasets import load_moons
from freqvi.infer.diffusion import diffusion_bound, energy_distance, gaussian_nll_per_dim
from freqvi.models import GaussianDiffusion

BATCH_SIZE = 256
NUM_SAMPLES = 1000


def train(estimator: str, budget: float, lr: float, seed: int) -> tuple[GaussianDiffusion, int, float, float]:
    """The fitted model, its steps, the loop's seconds and the CPU seconds of the whole fit call."""
    x = load_moons()
    options = {"loss": estimator, "lr": lr, "batch_size": BATCH_SIZE, "progress": False}
    if estimator == "importance":
        options.update(loss="time_subsampled", time_sampling="importance")
    torch.manual_seed(seed)
    trial = freqvi.fit(GaussianDiffusion(2), x, num_steps=200, seed=seed, **options)
    steps = max(1, int(200 * budget / trial.wall_time))
    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = GaussianDiffusion(2)
    start = time.process_time()
    result = freqvi.fit(model, x, num_steps=steps, seed=seed, **options)
    return model, steps, result.wall_time, time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180.0, help="CPU seconds of training")
    parser.add_argument("--estimator", choices=("time_subsampled", "importance", "simple"),
                        default="importance")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    test = load_moons("test")
    model, steps, loop, cpu = train(args.estimator, args.budget, args.lr, args.seed)
    samples = model.sample(NUM_SAMPLES, seed=args.seed)
    distance = energy_distance(samples, test[:NUM_SAMPLES])
    floor = energy_distance(test[NUM_SAMPLES:2 * NUM_SAMPLES], test[:NUM_SAMPLES])
    bound = diffusion_bound(model, test, seed=args.seed)
    gaussian = gaussian_nll_per_dim(load_moons(), test)
    print(f"moons, T = {model.num_steps}, estimator {args.estimator}, {steps} steps: loop {loop:.0f} s, "
          f"fit call {cpu:.0f} s CPU")
    print(f"energy distance  samples vs test {distance:.4f}; test half vs half {floor:.4f}; "
          f"ratio {distance / floor:.2f} (target <= 2): {'PASS' if distance <= 2 * floor else 'FAIL'}")
    print(f"held-out NLL     bound {bound.nats_per_dim:.4f} nats/dim (SE {bound.standard_error:.4f}, "
          f"{bound.bits_per_dim:.4f} bits/dim); fitted Gaussian {gaussian:.4f} nats/dim: "
          f"{'PASS' if bound.nats_per_dim < gaussian else 'FAIL'}")
    return 0 if distance <= 2 * floor and bound.nats_per_dim < gaussian and math.isfinite(distance) else 1


if __name__ == "__main__":
    raise SystemExit(main())

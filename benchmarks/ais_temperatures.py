"""The digits VAE's held-out log-likelihood: annealed importance sampling against its number of temperatures.

What it measures. A ``VAE(64, latent_dim=8)`` trained as in the tour (binarised digits, the
last 200 training images held back for early stopping, ``loss="mean_field"``, ``lr=2e-3``,
batches of 128, ``--steps`` steps, seed 0), then, on the first ``--images`` test images:

* :func:`freqvi.infer.annealed.annealed_log_likelihood` for each ``--temperatures`` value,
  ``--chains`` chains, 5 leapfrog steps of size 0.1: the estimate per image, its standard
  error, the acceptance rate and the CPU seconds per image;
* :func:`freqvi.log_likelihood` with ``K = --samples`` under the guide and under the
  Student-t proposal, with the share of images whose PSIS k-hat exceeds 0.7,

so that a user sees what more temperatures buy. CPU time is :func:`time.process_time`
(one thread). Run: ``python benchmarks/ais_temperatures.py --temperatures 100 1000 10000``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import freqvi
from freqvi.datasets import load_digits
from freqvi.infer.annealed import annealed_log_likelihood
from freqvi.models.vae import VAE


def trained_vae(steps: int) -> VAE:
    train = (load_digits("train") > 0.5).float()
    model = VAE(64, latent_dim=8)
    freqvi.fit(model, train[:-200], loss="mean_field", lr=2e-3, num_steps=steps, batch_size=128, seed=0,
               progress=False, validation_data=train[-200:], eval_every=max(steps // 10, 1))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--temperatures", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = trained_vae(args.steps)
    test = (load_digits("test") > 0.5).float()[:args.images]
    n = len(test)
    print(f"{'method':>32} {'nats/image':>11} {'s.e.':>7} {'diagnostic':>18} {'CPU s/image':>12}")
    for proposal in ("guide", "student_t"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", freqvi.errors.ImportanceSamplingWarning)
            start = time.process_time()
            ll = freqvi.log_likelihood(model, test, num_samples=args.samples, seed=1, proposal=proposal)
        cpu = (time.process_time() - start) / n
        label = f"IS {ll.proposal}, K = {args.samples}"
        flagged = f"k-hat>0.7: {np.mean(ll.pareto_k > 0.7):.1%}"
        print(f"{label:>32} {ll.total / n:11.4f} {ll.standard_error / n:7.4f} {flagged:>18} {cpu:12.4f}")
    for temperatures in args.temperatures:
        ais = annealed_log_likelihood(model, test, num_temperatures=temperatures, num_chains=args.chains,
                                      seed=1)
        print(f"{f'AIS, T = {temperatures}, {args.chains} chains':>32} {ais.total / n:11.4f} "
              f"{ais.standard_error / n:7.4f} {f'acceptance {ais.acceptance_rate:.2f}':>18} "
              f"{ais.cpu_seconds_per_observation:12.4f}")


if __name__ == "__main__":
    main()

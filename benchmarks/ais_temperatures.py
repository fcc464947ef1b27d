"""The digits VAE's held-out log-likelihood: annealed importance sampling against its number of temperatures.

What it measures. A ``VAE(64, latent_dim=8)`` trained as in the tour (binarised digits, the
last 200 training images held back for early stopping, ``loss="mean_field"``, ``lr=2e-3``,
batches of 128, ``--steps`` steps, seed 0, initial weights from ``torch.manual_seed(0)``), then:

* on the first ``--images`` test images, :func:`freqvi.log_likelihood` with ``K = --samples``
  under the guide and under the default proposal (``"auto"``, the adaptive Student-t): the estimate per
  image, its standard error, the share of images whose PSIS k-hat exceeds 0.7 and the CPU
  seconds per image;
* on the same images, ``log_likelihood(method="ais")`` for each ``--temperatures`` value,
  ``--chains`` chains, 5 leapfrog steps of size 0.1: the estimate per image, its standard
  error, its distance from the default importance estimate, the acceptance rate and the CPU
  seconds per image;
* on ``--simulated`` images drawn from the fitted VAE with their latents,
  :func:`freqvi.infer.annealed.bidirectional_log_likelihood` at the same settings: the lower
  (forward) and upper (reverse) bounds per image and their gap, with its standard error, which
  bounds the error of either on data like these,

so that a user sees what more temperatures buy. CPU time is :func:`time.process_time`
(one thread). Run: ``python benchmarks/ais_temperatures.py --temperatures 100 1000 10000``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import freqvi
from freqvi.datasets import load_digits
from freqvi.infer.annealed import bidirectional_log_likelihood
from freqvi.models.vae import VAE


def trained_vae(steps: int, seed: int = 0) -> VAE:
    """The tour's VAE (``freqvi.tour.vae_stage``), trained for ``steps`` steps from ``seed``."""
    train = (load_digits("train") > 0.5).float()
    torch.manual_seed(seed)  # the networks' initial weights (fit's seed sets only the draws)
    model = VAE(64, latent_dim=8)
    freqvi.fit(model, train[:-200], loss="mean_field", lr=2e-3, num_steps=steps, batch_size=128, seed=seed,
               progress=False, validation_data=train[-200:], eval_every=max(steps // 10, 1))
    return model


def simulated(model: VAE, n: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images drawn from the fitted VAE, ``z ~ N(0, I)``, ``x ~ Bernoulli(decoder(z))``, with ``z``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, model.latent_dim, generator=g)
        return torch.bernoulli(model.decode(z).mean, generator=g), z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--simulated", type=int, default=100)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--temperatures", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import arviz  # noqa: F401  (log_likelihood imports it on first use: not a cost of the first row)

    model = trained_vae(args.steps)
    test = (load_digits("test") > 0.5).float()[:args.images]
    n = len(test)
    print(f"{n} test images; {'method':>30} {'nats/image':>11} {'s.e.':>7} {'diagnostic':>18} "
          f"{'CPU s/image':>12}")
    for proposal in ("guide", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", freqvi.errors.ImportanceSamplingWarning)
            ll = freqvi.log_likelihood(model, test, num_samples=args.samples, seed=1, proposal=proposal)
        label = f"IS {ll.proposal}, K = {args.samples}"
        flagged = f"k-hat>0.7: {ll.num_heavy_tailed / n:.1%}"
        print(f"{label:>47} {ll.total / n:11.4f} {ll.standard_error / n:7.4f} {flagged:>18} "
              f"{ll.cpu_seconds_per_observation:12.4f}")
    x, z = simulated(model, args.simulated)
    print(f"\n{'temperatures':>12} {'AIS nats/image':>15} {'s.e.':>7} {'minus IS':>9} {'acceptance':>10} "
          f"{'CPU s/image':>12} | {args.simulated} simulated: {'lower':>9} {'upper':>9} {'gap/image':>9} "
          f"{'s.e.':>7} {'CPU s/image':>12}")
    for temperatures in args.temperatures:
        settings = dict(num_temperatures=temperatures, num_chains=args.chains)
        ais = freqvi.log_likelihood(model, test, method="ais", seed=1, **settings)
        start = time.process_time()
        bounds = bidirectional_log_likelihood(model, x, None, {"latent": z}, seed=2, **settings)
        bmc_cpu = (time.process_time() - start) / len(x)
        gap_se = math.hypot(bounds.lower.standard_error, bounds.upper.standard_error)
        print(f"{temperatures:12d} {ais.total / n:15.4f} {ais.standard_error / n:7.4f} "
              f"{(ais.total - ll.total) / n:9.4f} {ais.acceptance_rate:10.3f} "
              f"{ais.cpu_seconds_per_observation:12.4f} | {'':>13}{bounds.lower.total / len(x):9.4f} "
              f"{bounds.upper.total / len(x):9.4f} {bounds.gap / len(x):9.4f} {gap_se / len(x):7.4f} "
              f"{bmc_cpu:12.4f}", flush=True)


if __name__ == "__main__":
    main()

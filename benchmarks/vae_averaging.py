"""Does parameter averaging help the VAE? Held-out log-likelihood and ELBO at equal steps, over seeds.

The measurement behind ``freqvi vae``'s ``--ema-decay`` default (issue 21). Each seed fits
``freqvi vae``'s default model (:class:`~freqvi.models.VAE` on the 8x8 digits, latent dimension 8,
hidden widths (128, 64), Bernoulli likelihood, the mean-field ELBO, Adam ``lr=2e-3``, batch 128, one
thread) for ``--steps`` steps from the same initial weights and the same minibatches, three ways:

* ``raw``: the last iterate (no average);
* ``ema``: :class:`freqvi.EMA` with decay 0.999 and warm-up (below 9,000 steps every decay from
  0.999 up gives the same average, the warm-up's :math:`d_k = (1 + k)/(10 + k)`);
* ``polyak``: :class:`freqvi.Polyak` from the middle step on.

No early stopping: every fit takes ``--steps`` steps. Each is measured on the 297 test images by
:func:`freqvi.log_likelihood` (``--num-samples`` importance samples per image, the default proposal)
and :func:`freqvi.elbo_terms` (100 draws), both per image, and the script prints the paired
difference of each average from ``raw`` over the seeds: its mean, its standard error (standard
deviation over seeds over the square root of their number) and the per-seed values.

Run ``python benchmarks/vae_averaging.py`` (5 seeds x 3 fits of 3,000 steps: about 10 CPU minutes),
or ``--seeds 1 --steps 200`` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import statistics

import pyro
import torch

import freqvi
from freqvi.datasets import load_digits
from freqvi.models import VAE

AVERAGES = {"raw": lambda steps: None, "ema": lambda steps: freqvi.EMA(0.999),
            "polyak": lambda steps: freqvi.Polyak(start=steps // 2 + 1)}


def held_out(average, steps: int, seed: int, num_samples: int) -> tuple[float, float]:
    """(log-likelihood, ELBO) per test image of the VAE fitted from ``seed`` with ``average``."""
    train, test = load_digits("train"), load_digits("test")
    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = VAE(64, 8, (128, 64), "bernoulli")
    freqvi.fit(model, train, loss="mean_field", lr=2e-3, num_steps=steps, batch_size=128, seed=seed,
               progress=False, average=average)
    loglik = freqvi.log_likelihood(model, test, num_samples=num_samples, seed=seed)
    elbo = freqvi.elbo_terms(model, test, num_samples=100, seed=seed)
    return loglik.total / len(test), elbo.elbo / len(test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in AVERAGES}
    for seed in range(args.seeds):
        for name, average in AVERAGES.items():
            results[name].append(held_out(average(args.steps), args.steps, seed, args.num_samples))
            loglik, elbo = results[name][-1]
            print(f"seed {seed}  {name:<6} log-likelihood {loglik:.4f}  ELBO {elbo:.4f} nats/image",
                  flush=True)
    for name in AVERAGES:
        for k, measure in enumerate(("log-likelihood", "ELBO")):
            diffs = [a[k] - b[k] for a, b in zip(results[name], results["raw"], strict=True)]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
            print(f"{name:<6} {measure:<14} mean {statistics.mean(x[k] for x in results[name]):.4f}; "
                  f"minus raw {statistics.mean(diffs):+.4f} (s.e. {se:.4f}) per seed "
                  f"{' '.join(f'{d:+.3f}' for d in diffs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

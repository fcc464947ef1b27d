"""Cost of one SVI step under each particle estimator, relative to Pyro's Trace_ELBO.

The model is factor analysis (``dim=10``, ``latent_dim=3``) on ``n`` simulated
rows with the free per-observation guide (``mean_field_guide()``). Each
estimator takes the same Adam steps in this process, timed after a warm-up, as
the best of three blocks of steps; the table prints milliseconds per step, the
ratio to Trace_ELBO (one particle) and, for the particle estimators, the ratio
of ``K`` particles to one.

The acceptance target: vectorised particles keep ``K = 10`` under three times
the cost of ``K = 1`` (IWAE and DReG). Run ``python benchmarks/estimator_cost.py``
(about a minute) or ``--quick``.
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import freqvi
from freqvi.estimators import IWAE_ELBO, STL_ELBO, DReG_ELBO
from freqvi.models import FactorAnalysis

TARGET_K, TARGET_RATIO = 10, 3.0


def data(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    loading = torch.randn(10, 3, generator=generator)
    z = torch.randn(n, 3, generator=generator)
    return z @ loading.T + 0.5 * torch.randn(n, 10, generator=generator)


def seconds_per_step(elbo, x: torch.Tensor, steps: int) -> float:
    """Best of three blocks of ``steps`` SVI steps, after a warm-up block."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    fa = FactorAnalysis(10, 3)
    guide = fa.mean_field_guide()
    svi = SVI(fa.model, guide, Adam({"lr": 0.01}), elbo)
    best = float("inf")
    for block in range(4):
        start = time.perf_counter()
        for _ in range(steps):
            svi.step(x)
        if block:
            best = min(best, (time.perf_counter() - start) / steps)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="observations (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--quick", action="store_true", help="n=200, 5 steps per block")
    args = parser.parse_args(argv)
    n, steps = (200, 5) if args.quick else (args.n, args.steps)
    x = data(n)
    base = seconds_per_step(Trace_ELBO(), x, steps)
    rows = [("Trace_ELBO", 1, base, None)]
    for cls in (IWAE_ELBO, DReG_ELBO, STL_ELBO):
        one = None
        for k in (1, 10, 100):
            t = seconds_per_step(cls(num_particles=k, max_plate_nesting=1), x, steps)
            one = t if k == 1 else one
            rows.append((cls.__name__, k, t, t / one))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), pyro {pyro.__version__}, "
          f"freqvi {freqvi.__version__}; factor analysis d=10 q=3, n={n}, mean-field guide; "
          f"best of 3 blocks of {steps} steps")
    print(f"{'estimator':<12} {'K':>4} {'ms/step':>9} {'vs Trace_ELBO':>14} {'vs K=1':>8}")
    passed = True
    for name, k, t, vs_one in rows:
        verdict = ""
        if k == TARGET_K and name in ("IWAE_ELBO", "DReG_ELBO"):
            ok = vs_one < TARGET_RATIO
            passed &= ok
            verdict = f"  target < {TARGET_RATIO:g}: {'PASS' if ok else 'FAIL'}"
        ratio = "-" if vs_one is None else f"{vs_one:.2f}"
        print(f"{name:<12} {k:>4} {1e3 * t:>9.3f} {t / base:>14.2f} {ratio:>8}{verdict}")
    print(f"\nacceptance target (K={TARGET_K} < {TARGET_RATIO:g}x K=1): {'PASS' if passed else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""freqvi.fit against a plain ``pyro.infer.SVI`` loop on user-written models, in one process.

The models are those of ``tests/test_user_model_matrix.py`` (a Poisson mixture summed out by
enumeration, an HMM with ``pyro.markov``, a hierarchical normal model with a global latent, a
crossed-effects Poisson GLMM, a linear conditional VAE), each with the guide a Pyro tutorial would
give it. Both sides run the same number of Adam steps on the same estimator from the same start;
blocks alternate between the two, and the table prints the median CPU milliseconds per step of
each and their ratio (freqvi / SVI), which should be near 1: freqvi's loop adds input checks once,
a progress bar and finite-step guards.

Run ``python benchmarks/user_models_vs_svi.py`` (about two minutes) or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.optim import Adam

import freqvi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_user_model_matrix as matrix


def cases():
    """(name, model, guide factory, data, freqvi loss, Pyro ELBO)."""
    enum = TraceEnum_ELBO(max_plate_nesting=1)
    return [
        ("Poisson mixture, enumerated", matrix.poisson_mixture, lambda: matrix.empty_guide,
         (matrix.poisson_counts(),), "enum", enum),
        ("HMM (pyro.markov), enumerated", matrix.hmm, lambda: matrix.empty_guide, (matrix.hmm_data(),),
         "enum", enum),
        ("hierarchical normal, AutoMultivariateNormal", matrix.hierarchical,
         lambda: AutoMultivariateNormal(matrix.hierarchical), (matrix.hierarchical_data(),), "trace",
         Trace_ELBO()),
        ("crossed Poisson GLMM, AutoMultivariateNormal", matrix.crossed,
         lambda: AutoMultivariateNormal(matrix.crossed), matrix.crossed_data(), "trace", Trace_ELBO()),
        ("linear conditional VAE, AutoNormal", matrix.cvae, lambda: AutoNormal(matrix.cvae),
         matrix.cvae_data(), "trace", Trace_ELBO()),
    ]


def freqvi_block(model, guide, data, loss, steps):
    start = time.process_time()
    freqvi.fit(model, guide=guide, data=data, loss=loss, num_steps=steps, lr=0.01, progress=False)
    return (time.process_time() - start) / steps


def svi_block(model, guide, data, elbo, steps):
    svi = SVI(model, guide, Adam({"lr": 0.01}), elbo)
    start = time.process_time()
    for _ in range(steps):
        svi.step(*data)
    return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter blocks")
    args = parser.parse_args()
    steps, repeats = (50, 3) if args.quick else (200, 5)
    torch.set_num_threads(1)
    print(f"{'model and guide':48s} {'freqvi ms':>10s} {'SVI ms':>8s} {'ratio':>6s}")
    for name, model, make_guide, data, loss, elbo in cases():
        ours, theirs = [], []
        for _ in range(repeats):
            pyro.clear_param_store()
            ours.append(freqvi_block(model, make_guide(), data, loss, steps))
            pyro.clear_param_store()
            theirs.append(svi_block(model, make_guide(), data, elbo, steps))
        a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        print(f"{name:48s} {a:10.2f} {b:8.2f} {a / b:6.2f}")


if __name__ == "__main__":
    main()

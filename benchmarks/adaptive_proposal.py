"""The digits VAE's held-out log-likelihood by importance sampling: guide, Student-t, adaptive Student-t.

What it measures. The tour's ``VAE(64, latent_dim=8)`` (``trained_vae`` of
``ais_temperatures.py``: binarised digits, ``--steps`` steps, training seed ``--seeds``),
then on the tour's test images (all 297 of ``load_digits("test", binarize=True)``, or the
first ``--images``), for each proposal of :func:`freqvi.log_likelihood` (``"guide"``,
``"student_t"``, ``"adaptive"``, the last ``"auto"``'s choice) and each ``K`` of
``--samples``: the estimate per image with its Monte-Carlo standard error, the share of
images whose PSIS k-hat exceeds 0.7 and the CPU seconds per image (pilot draws included);
with ``--ais T``, also ``log_likelihood(method="ais", num_temperatures=T)`` and each
importance estimate's largest and mean absolute difference from it per image. CPU time is
:func:`time.process_time` (one thread). Run: ``python benchmarks/adaptive_proposal.py``.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from ais_temperatures import trained_vae

import freqvi
from freqvi.datasets import load_digits
from freqvi.errors import ImportanceSamplingWarning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--proposals", nargs="+", default=["guide", "student_t", "adaptive"])
    parser.add_argument("--ais", type=int, default=None, help="AIS temperatures (none: no AIS check)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import arviz  # noqa: F401  (log_likelihood imports it on first use: not a cost of the first row)

    test = load_digits("test", binarize=True)[:args.images]
    n = len(test)
    for seed in args.seeds:
        model = trained_vae(args.steps, seed)
        ais = None
        if args.ais:
            ais = freqvi.log_likelihood(model, test, method="ais", num_temperatures=args.ais, seed=1)
            print(f"seed {seed}: AIS ({args.ais} temperatures) {ais.total / n:.4f} nats/image, s.e. "
                  f"{ais.standard_error / n:.4f}, CPU {ais.cpu_seconds_per_observation:.3f} s/image",
                  flush=True)
        for k in args.samples:
            for proposal in args.proposals:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ImportanceSamplingWarning)
                    ll = freqvi.log_likelihood(model, test, num_samples=k, seed=1, proposal=proposal)
                line = (f"seed {seed} K={k:5d} {proposal:>9}: {ll.total / n:9.4f} nats/image, s.e. "
                        f"{ll.standard_error / n:.4f}, k-hat>0.7 {ll.num_heavy_tailed / n:6.1%} "
                        f"(max {ll.max_pareto_k:.2f}), CPU {ll.cpu_seconds_per_observation:.4f} s/image")
                if ais is not None:
                    gap = (ll.per_observation.double() - ais.per_observation.double()).abs()
                    line += f", |IS-AIS| max {gap.max():.3f} mean {gap.mean():.3f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()

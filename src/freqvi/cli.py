"""The ``freqvi`` console command."""

from __future__ import annotations

import argparse
import sys

import torch

from freqvi.errors import FreqviError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freqvi",
        description="Maximum-likelihood fitting of latent variable models on Pyro. "
        "Without a subcommand: EM for a Gaussian mixture on the iris data.",
    )
    sub = parser.add_subparsers(dest="command")
    em = sub.add_parser("em", help="fit a Gaussian mixture by EM and print the estimates")
    em.add_argument("--components", type=int, default=3, help="number of mixture components (3)")
    em.add_argument("--covariance", choices=["full", "diag", "spherical"], default="full")
    em.add_argument("--max-iter", type=int, default=1000)
    em.add_argument("--tol", type=float, default=1e-7, help="relative log-likelihood tolerance")
    em.add_argument("--seed", type=int, default=0)
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run_em(args: argparse.Namespace) -> None:
    from sklearn.datasets import load_iris

    import freqvi
    from freqvi.models import GaussianMixture

    x = torch.as_tensor(load_iris().data, dtype=torch.float32)
    model = GaussianMixture(args.components, x.shape[1], args.covariance)
    result = freqvi.em(model, x, max_iter=args.max_iter, tol=args.tol, seed=args.seed,
                       progress=not args.quiet)
    loglik = freqvi.log_likelihood(model, None, x).total
    est = model.estimates()
    print(f"data: iris, n = {x.shape[0]}, dim = {x.shape[1]}")
    print(f"model: GaussianMixture({args.components}, {x.shape[1]}, covariance={args.covariance!r})")
    for k in range(args.components):
        cov = est["covariances"][k]
        var = torch.diagonal(cov) if cov.dim() == 2 else cov
        print(f"  component {k}: weight {est['weights'][k]:.4f}  mean {est['locs'][k].tolist()}  "
              f"variances {[round(v, 4) for v in var.reshape(-1).tolist()]}")
    print(f"log-likelihood: {loglik:.4f} ({loglik / x.shape[0]:.4f} per observation)")
    print(f"iterations: {result.num_iter}, converged: {result.converged}, M-step: {result.m_step}, "
          f"time: {result.wall_time:.2f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freqvi`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command is None:
        args = _parser().parse_args(["em", *(argv or [])])
    try:
        _run_em(args)
    except FreqviError as exc:
        print(f"freqvi: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

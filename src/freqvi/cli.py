"""The ``freqvi`` console command.

Each subcommand is one entry of :data:`COMMANDS`: a function that adds its
subparser and sets ``run`` (the job, returning an exit status) as its default.
Later subcommands (``vae``, ``diffusion``, ``tour``) are added the same way.
``freqvi`` with no subcommand runs :data:`DEFAULT_COMMAND`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import freqvi
from freqvi.datasets import load_array, load_iris
from freqvi.errors import FreqviError, FreqviInputError, FreqviWarning
from freqvi.infer.em import M_STEPS
from freqvi.models import GaussianMixture
from freqvi.models.gaussian_mixture import COVARIANCE_TYPES

DEFAULT_COMMAND = "em"
EXIT_ERROR = 2

Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers() returns


# ----- the em subcommand -----------------------------------------------------------------------
def add_em_command(subparsers: Subparsers) -> None:
    """Adds ``freqvi em``: a Gaussian mixture fitted by EM, its estimates and log-likelihood."""
    em = subparsers.add_parser(
        "em",
        help="fit a Gaussian mixture by EM and print the estimates (the default command)",
        description="Fit a Gaussian mixture by maximum likelihood with EM (freqvi.em) and print "
        "the weights, means and covariances, the log-likelihood, the iterations and the time. "
        "Data: the embedded iris measurements (150 x 4) unless --data is given.",
    )
    em.add_argument("--data", metavar="PATH", type=Path,
                    help="a .npy or .csv file, one observation per row (CSV: numeric, optional "
                    "header row); default: iris")
    em.add_argument("--components", metavar="K", type=int, default=3,
                    help="mixture components (default: %(default)s)")
    em.add_argument("--covariance", choices=COVARIANCE_TYPES, default="full",
                    help="covariance structure of each component (default: %(default)s)")
    em.add_argument("--max-iter", metavar="N", type=int, default=1000,
                    help="most EM iterations (default: %(default)s)")
    em.add_argument("--tol", type=float, default=1e-5,
                    help="stop when the log-likelihood per observation changes by less than "
                    "this (default: %(default)s)")
    em.add_argument("--seed", type=int, default=0,
                    help="random seed of the k-means++ initialisation (default: %(default)s)")
    em.add_argument("--m-step", choices=M_STEPS, default="auto",
                    help="closed_form (sufficient statistics) or gradient (Adam on Q); "
                    "auto (default) takes the closed form")
    em.add_argument("--full", action="store_true",
                    help="print full covariance matrices, not only their diagonals")
    em.add_argument("--json", metavar="PATH", type=Path,
                    help="also write the estimates and metrics to this JSON file")
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    em.set_defaults(run=run_em)


def run_em(args: argparse.Namespace) -> int:
    """Fits the mixture that ``args`` describes, prints the report and writes ``--json``."""
    x, data_name = _load_data(args.data)
    if args.json is not None:
        _check_writable(args.json)
    model = GaussianMixture(args.components, x.shape[1], args.covariance)
    result = freqvi.em(model, x, m_step=args.m_step, max_iter=args.max_iter, tol=args.tol,
                       seed=args.seed, progress=not args.quiet)
    loglik = freqvi.log_likelihood(model, None, x)
    report = em_report(data_name, x, model, result, loglik, args)
    print(format_em_report(report, full=args.full))
    if args.json is not None:
        _write_json(report, args.json)
    return 0


def _load_data(path: Path | None) -> tuple[torch.Tensor, str]:
    """The observations ``(n, dim)`` and the name to print for them."""
    if path is None:
        return load_iris(), "iris"
    return load_array(path), str(path)


def em_report(data_name: str, x: torch.Tensor, model: GaussianMixture, result: freqvi.EMResult,
              loglik: freqvi.LogLikelihood, args: argparse.Namespace) -> dict:
    """The fit as a JSON-ready dict: data, model, estimates, log-likelihood and fit metrics.

    Estimates keep scikit-learn's shapes: ``weights`` ``(K,)``, ``locs`` ``(K, d)``,
    ``covariances`` ``(K, d, d)`` full, ``(K, d)`` diag, ``(K,)`` spherical.
    """
    n, dim = x.shape
    return {
        "command": "em",
        "data": {"name": data_name, "n": n, "dim": dim, "dtype": str(x.dtype).removeprefix("torch.")},
        "model": {"class": type(model).__name__, "n_components": model.n_components, "dim": dim,
                  "covariance": model.covariance},
        "estimates": {k: v.tolist() for k, v in model.estimates().items()},
        "log_likelihood": {"total": loglik.total, "mean_per_observation": loglik.total / n,
                           "method": loglik.method},
        "fit": {"num_iter": result.num_iter, "converged": result.converged, "m_step": result.m_step,
                "wall_time": result.wall_time, "seed": args.seed, "max_iter": args.max_iter,
                "tol": args.tol, "objective_trace": result.log_likelihood},
    }


def format_em_report(report: dict, full: bool = False) -> str:
    """The report of :func:`em_report` as plain text; ``full`` prints whole covariance matrices."""
    data, model, fit, ll = report["data"], report["model"], report["fit"], report["log_likelihood"]
    lines = [
        f"data            {data['name']}: n = {data['n']}, dim = {data['dim']} ({data['dtype']})",
        f"model           GaussianMixture(n_components={model['n_components']}, dim={model['dim']}, "
        f"covariance={model['covariance']!r})",
        "",
        *_format_components(report["estimates"], model["covariance"], full),
        "",
        f"log-likelihood  {ll['total']:.4f} total, {ll['mean_per_observation']:.6f} per observation",
        f"iterations      {fit['num_iter']} of at most {fit['max_iter']}",
        f"converged       {'yes' if fit['converged'] else 'no'} (tolerance {fit['tol']:g} per observation)",
        f"M-step          {fit['m_step']}",
        f"wall time       {fit['wall_time']:.2f} s",
    ]
    return "\n".join(lines)


def _format_components(estimates: dict, covariance: str, full: bool) -> list[str]:
    covariances = _full_covariances(torch.tensor(estimates["covariances"]), covariance,
                                    len(estimates["locs"][0]))
    lines = []
    for k, (weight, loc, cov) in enumerate(
            zip(estimates["weights"], estimates["locs"], covariances, strict=True)):
        lines += [f"component {k}     weight {weight:.4f}", f"  mean          {_row(loc)}"]
        if full:
            lines += [f"  {'covariance' if i == 0 else '':12}  {_row(r)}" for i, r in enumerate(cov.tolist())]
        else:
            lines.append(f"  cov diagonal  {_row(cov.diagonal().tolist())}")
    return lines


def _full_covariances(covariances: torch.Tensor, covariance: str, dim: int) -> torch.Tensor:
    """Covariances in any of the three shapes as matrices ``(K, d, d)``."""
    if covariance == "full":
        return covariances
    variances = covariances.unsqueeze(-1).expand(-1, dim) if covariance == "spherical" else covariances
    return torch.diag_embed(variances)


def _row(values: Sequence[float]) -> str:
    return " ".join(f"{v:>10.5g}" for v in values)


def _check_writable(path: Path) -> None:
    if not path.parent.is_dir():
        raise FreqviInputError(f"--json: directory {str(path.parent)!r} does not exist.")


def _write_json(report: dict, path: Path) -> None:
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise FreqviError(f"cannot write {str(path)!r}: {exc.strerror or exc}.") from None


# ----- the command line ------------------------------------------------------------------------
COMMANDS: dict[str, Callable[[Subparsers], None]] = {"em": add_em_command}


def build_parser() -> argparse.ArgumentParser:
    """The ``freqvi`` parser, one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="freqvi",
        description="Maximum-likelihood fitting of latent variable models on Pyro. "
        f"Without a command, runs '{DEFAULT_COMMAND}': EM for a Gaussian mixture on the iris "
        "data (options of 'freqvi em' work without the command name too).",
        epilog="'freqvi COMMAND --help' describes a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"freqvi {freqvi.__version__}")
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for add_command in COMMANDS.values():
        add_command(subparsers)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """``argv`` with :data:`DEFAULT_COMMAND` put first when it names no command."""
    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return [DEFAULT_COMMAND, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``freqvi`` command; returns the exit status.

    Errors that freqvi raises on purpose are printed as one line,
    ``freqvi: error: <message>``, on stderr, with exit status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(_with_default_command(argv))
    except SystemExit as exc:  # --help, --version, or a usage error that argparse printed
        return _exit_status(exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FreqviWarning)
        # ArviZ (imported lazily for importance sampling) warns once a day about its refactor.
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        try:
            return args.run(args)
        except FreqviError as exc:
            print(f"freqvi: error: {_error_message(exc)}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("freqvi: interrupted", file=sys.stderr)
            return 130
        finally:
            _print_warnings(caught)


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else EXIT_ERROR


def _error_message(exc: FreqviError) -> str:
    """The message of the error freqvi raised, on one line.

    Pyro re-raises errors from inside a traced model as a copy with the trace's shape
    table appended; the original is the copy's ``__cause__``.
    """
    while isinstance(exc.__cause__, FreqviError):
        exc = exc.__cause__
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for warning in caught:
        print(f"freqvi: warning: {warning.message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

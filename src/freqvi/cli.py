"""The ``freqvi`` console command.

Each subcommand is one entry of :data:`COMMANDS`: a function that adds its
subparser and sets ``run`` (the job, returning an exit status) as its default.
Later subcommands (``vae``, ``diffusion``, ``tour``) are added the same way.
``freqvi`` with no subcommand runs :data:`DEFAULT_COMMAND`.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

import freqvi
from freqvi import plots, reporting
from freqvi.cli_options import check_outputs, count, path, real, seed, widths
from freqvi.datasets import load_array, load_digits, load_iris, load_moons, load_swiss_roll
from freqvi.errors import DegenerateDataWarning, FreqviError, FreqviInputError, FreqviWarning
from freqvi.infer.diffusion import diffusion_bound, energy_distance, gaussian_nll_per_dim
from freqvi.infer.em import M_STEPS
from freqvi.infer.evaluation import amortization_gap, elbo_terms
from freqvi.infer.recipes import DIFFUSION, Recipe
from freqvi.infer.recipes import VAE as VAE_RECIPE
from freqvi.infer.threads import ENV_VAR, intra_op_threads, step_entries
from freqvi.models import VAE, GaussianDiffusion, GaussianMixture
from freqvi.models.diffusion import SAMPLERS
from freqvi.models.gaussian_mixture import COVARIANCE_TYPES
from freqvi.models.noise_schedule import SCHEDULES
from freqvi.models.vae import LIKELIHOODS, MIN_NOISE_SCALE

DEFAULT_COMMAND = "em"
EXIT_ERROR = 2  # input refused: argparse's status for usage errors
EXIT_FAILURE = 1  # a run that failed
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it

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
    em.add_argument("--data", metavar="PATH", type=path,
                    help="a .npy or .csv file, one observation per row (CSV: numeric, optional "
                    "header row); default: iris")
    em.add_argument("--components", metavar="K", type=count(), default=3,
                    help="mixture components (default: %(default)s)")
    em.add_argument("--covariance", choices=COVARIANCE_TYPES, default="full",
                    help="covariance structure of each component (default: %(default)s)")
    em.add_argument("--max-iter", metavar="N", type=count(), default=1000,
                    help="most EM iterations (default: %(default)s)")
    em.add_argument("--tol", type=real(inclusive=True), default=1e-5,
                    help="stop when the log-likelihood per observation changes by less than "
                    "this (default: %(default)s)")
    em.add_argument("--seed", type=seed, default=0,
                    help="random seed of the k-means++ initialisation (default: %(default)s)")
    em.add_argument("--m-step", choices=M_STEPS, default="auto",
                    help="closed_form (sufficient statistics) or gradient (Adam on Q); "
                    "auto (default) takes the closed form")
    em.add_argument("--full", action="store_true",
                    help="print full covariance matrices, not only their diagonals")
    em.add_argument("--json", metavar="PATH", type=path,
                    help="also write the estimates and metrics to this JSON file")
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads_argument(em)
    _add_checkpoint_arguments(em, 100, "EM iterations")
    em.set_defaults(run=run_em)


def run_em(args: argparse.Namespace) -> int:
    """Fits the mixture that ``args`` describes, prints the report and writes ``--json``."""
    x, data_name = _load_data(args.data)
    model = GaussianMixture(args.components, x.shape[1], args.covariance)
    with intra_op_threads(entries=step_entries(x)):
        result = freqvi.em(model, x, m_step=args.m_step, max_iter=args.max_iter, tol=args.tol,
                           seed=args.seed, progress=not args.quiet, **_checkpointing(args))
        _stop_if_interrupted(result, args)
        loglik = freqvi.log_likelihood(model, x)
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

    Numbers follow :mod:`freqvi.reporting`'s convention (units in the keys, legend under
    ``"conventions"``); the log-likelihood is of the fitted data, exact for a mixture (its
    Monte-Carlo standard error is then 0). Estimates keep scikit-learn's shapes: ``weights``
    ``(K,)``, ``locs`` ``(K, d)``, ``covariances`` ``(K, d, d)`` full, ``(K, d)`` diag, ``(K,)`` spherical.
    """
    n, dim = x.shape
    return {
        "command": "em",
        "data": {"name": data_name, "n": n, "dim": dim, "dtype": str(x.dtype).removeprefix("torch.")},
        "model": {"class": type(model).__name__, "n_components": model.n_components, "dim": dim,
                  "covariance": model.covariance},
        "estimates": {k: v.tolist() for k, v in model.estimates().items()},
        "log_likelihood": {**reporting.held_out(loglik.total, loglik.standard_error, None, n),
                           "method": loglik.method},
        "fit": {"num_iter": result.num_iter, "converged": result.converged, "m_step": result.m_step,
                "wall_time": result.wall_time, "seed": args.seed, "max_iter": args.max_iter,
                "tol": args.tol, "objective_trace_total": result.log_likelihood},
        "conventions": reporting.conventions(),
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
        f"log-likelihood  {ll['total']:.4f} nats total, {ll['mean_per_observation']:.6f} nats per "
        "observation " + ("(exact)" if ll["method"] == "exact" else
           f"({ll['method']}; Monte-Carlo s.e. {ll['monte_carlo_standard_error_total']:.4f} of the total, "
           f"{ll['monte_carlo_standard_error_per_observation']:.6f} per observation)"),
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


def _write_json(report: dict, path: Path) -> None:
    try:
        path.write_text(reporting.to_json(report))
    except OSError as exc:
        raise FreqviError(f"cannot write {str(path)!r}: {exc.strerror or exc}.") from None


# ----- the vae subcommand ----------------------------------------------------------------------
VAE_ESTIMATORS = ("mean_field", "trace", "iwae", "dreg", "stl")
VAE_TEST_FRACTION = 0.2
VAE_EVAL_EVERY = 200
AMORTIZATION_GAP_POINTS = 10
VAE_PIXELS = ("binary", "grey")


def add_vae_command(subparsers: Subparsers) -> None:
    """Adds ``freqvi vae``: a VAE fitted by SVI, evaluated on held-out data, with pictures."""
    vae = subparsers.add_parser(
        "vae",
        help="fit a variational autoencoder and write its held-out metrics and pictures",
        description="Fit a VAE by maximum likelihood through the ELBO (freqvi.fit, early stopping on "
        "the held-out ELBO), then evaluate it on held-out data: the log-likelihood by importance "
        "sampling from a Student-t proposal built on the encoder and moved to each observation's "
        "posterior moments from pilot draws (freqvi.log_likelihood's default; "
        "Monte-Carlo and sampling standard errors, PSIS k-hat), the ELBO's reconstruction and KL "
        "terms, the amortisation gap, each in nats per observation. Writes metrics.json, "
        "reconstructions.png, samples.png and, for --latent-dim 2, latent.png to --out. Data: the "
        "embedded 8x8 digits (train 1,500 / test 297) binarised at 0.5 (--pixels) unless --data is "
        "given, whose rows are then "
        f"split at random (seed 0) into {1 - VAE_TEST_FRACTION:.0%} train and {VAE_TEST_FRACTION:.0%} test.",
    )
    vae.add_argument("--data", metavar="PATH", type=path,
                     help="a .npy or .csv file, one observation per row; default: the digits")
    vae.add_argument("--latent-dim", metavar="Q", type=count(), default=8,
                     help="latent dimension (default: %(default)s)")
    vae.add_argument("--hidden", metavar="H1,H2", type=widths, default=(128, 64),
                     help="hidden widths of the encoder, the decoder mirrors them (default: 128,64)")
    vae.add_argument("--likelihood", choices=LIKELIHOODS, default="bernoulli",
                     help="p(x | z) (default: %(default)s)")
    vae.add_argument("--pixels", choices=VAE_PIXELS,
                     help="the embedded digits binarised at 0.5 (binary, the default: the Bernoulli "
                     "likelihood is then a probability and the log-likelihood a log-likelihood) or as grey "
                     "levels in [0, 1] (grey: under the Bernoulli likelihood a cross-entropy, not a "
                     "log-likelihood; --likelihood continuous_bernoulli is a density on them); "
                     "not with --data")
    vae.add_argument("--min-noise-scale", metavar="S", type=real(inclusive=True), default=MIN_NOISE_SCALE,
                     help="gaussian likelihood: the floor of each column's noise scale, which alone bounds "
                     "the likelihood on a constant column (default: %(default)s, a variance of 1e-6)")
    vae.add_argument("--estimator", choices=VAE_ESTIMATORS, default=VAE_RECIPE.loss,
                     help="ELBO estimator: mean_field (analytic KL), trace, iwae, dreg, stl "
                     "(default: %(default)s)")
    vae.add_argument("--particles", metavar="K", type=count(), default=10,
                     help="importance samples of iwae and dreg (default: %(default)s)")
    vae.add_argument("--steps", metavar="N", type=count(), default=VAE_RECIPE.num_steps,
                     help="most training steps (default: %(default)s)")
    vae.add_argument("--batch-size", metavar="B", type=count(), default=VAE_RECIPE.batch_size,
                     help="observations per step (default: %(default)s)")
    vae.add_argument("--lr", type=real(), default=VAE_RECIPE.lr,
                     help="Adam's learning rate (default: %(default)s)")
    vae.add_argument("--ema-decay", metavar="D", type=real(inclusive=True, below=1.0),
                     default=VAE_RECIPE.average.decay if VAE_RECIPE.average else 0.0,
                     help="keep an exponential moving average of the weights (freqvi.EMA, with warm-up), "
                     "evaluate it for early stopping and keep it; 0: the iterates themselves (default: "
                     "%(default)s: measured by benchmarks/vae_averaging.py, it raised the held-out ELBO but "
                     "not the held-out log-likelihood)")
    vae.add_argument("--patience", metavar="P", type=count(), default=5,
                     help="stop after P held-out evaluations (every 200 steps) without a new best "
                     "(default: %(default)s)")
    vae.add_argument("--num-samples", metavar="K", type=count(), default=1000,
                     help="importance samples per observation for the log-likelihood (default: %(default)s)")
    vae.add_argument("--gap-steps", metavar="N", type=count(), default=500,
                     help="Adam steps of the per-point guides (amortisation gap) (default: %(default)s)")
    _add_run_arguments(vae, Path("vae-out"))
    _add_checkpoint_arguments(vae, 1000, "training steps")
    vae.set_defaults(run=run_vae)


def _add_run_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """``--out``, ``--seed`` and ``--quiet``, shared by the commands that write a folder."""
    parser.add_argument("--out", metavar="DIR", type=path, default=out,
                        help="output folder, created if missing (default: %(default)s)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads_argument(parser)


def _add_checkpoint_arguments(parser: argparse.ArgumentParser, every: int, unit: str) -> None:
    """``--checkpoint``, ``--checkpoint-every`` and ``--resume``: the driver's ``checkpoint=``/``resume=``."""
    parser.add_argument("--checkpoint", metavar="PATH", type=path,
                        help=f"write the run's state to this file every --checkpoint-every {unit}, at the "
                        "end and on Ctrl-C, so that --resume can continue it (default: no checkpoint)")
    parser.add_argument("--checkpoint-every", metavar="N", type=count(), default=every,
                        help=f"{unit} between checkpoint writes (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --checkpoint PATH (run with the same options; a "
                        "larger --steps or --max-iter goes further): the result is that of an uninterrupted "
                        "run, bit for bit on CPU")


def _checkpointing(args: argparse.Namespace) -> dict:
    """The driver's checkpoint options that ``args`` asks for."""
    if args.checkpoint is None:
        return {}
    return {"checkpoint": args.checkpoint, "checkpoint_every": args.checkpoint_every,
            "resume": args.checkpoint if args.resume else None}


def _stop_if_interrupted(result: freqvi.FitResult | freqvi.EMResult, args: argparse.Namespace) -> None:
    """Ends the command after a fit that Ctrl-C interrupted, before its evaluation, saying how to go on."""
    if not result.interrupted:
        return
    if args.checkpoint is None:
        raise KeyboardInterrupt("nothing was saved; give --checkpoint PATH to keep an interrupted run")
    raise KeyboardInterrupt(f"rerun with --resume to continue from the checkpoint {str(args.checkpoint)!r}")


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", metavar="N", type=count(),
                        help=f"torch's intra-op threads (default: ${ENV_VAR} if set, else one for small "
                        "data, as freqvi's drivers choose)")


def run_vae(args: argparse.Namespace) -> int:
    """Fits the VAE that ``args`` describes, evaluates it, prints a summary and writes ``--out``."""
    recipe = vae_recipe(args)  # the average's decay is checked here, before any work
    train, test, labels, data_name = _vae_data(args.data, args.pixels)
    _make_folder(args.out)
    torch.manual_seed(args.seed)  # the initial weights (torch's own seed differs from process to process)
    model = VAE(train.shape[1], args.latent_dim, args.hidden, args.likelihood,
                min_noise_scale=args.min_noise_scale)
    model.check_data(train)
    with warnings.catch_warnings():  # the held-out rows are scored, not fitted: refusals only
        warnings.simplefilter("ignore", DegenerateDataWarning)
        model.check_data(test)
    with intra_op_threads(entries=step_entries(train, args.batch_size)):
        result = recipe.fit(model, train, seed=args.seed, progress=not args.quiet, validation_data=test,
                            eval_every=VAE_EVAL_EVERY, patience=args.patience, **_checkpointing(args))
        _stop_if_interrupted(result, args)
        report = vae_report(data_name, train, test, model, result, args)
        pictures = _vae_pictures(model, test, labels, args.out)
        report["pictures"] = [p.name for p in pictures]
        _write_json(report, args.out / "metrics.json")
        print(format_vae_report(report, args.out))
    return 0


def vae_recipe(args: argparse.Namespace) -> Recipe:
    """:data:`freqvi.infer.recipes.VAE` with the fields the arguments set (their defaults are its own).

    :raises ~freqvi.errors.FreqviInputError: an ``--ema-decay`` outside [0, 1) (0: no average).
    """
    particles = (("num_particles", args.particles),) if args.estimator in ("iwae", "dreg") else ()
    average = freqvi.EMA(decay=args.ema_decay) if args.ema_decay else None
    return replace(VAE_RECIPE, loss=args.estimator, loss_options=particles, lr=args.lr,
                   batch_size=args.batch_size, num_steps=args.steps, average=average)


def _vae_data(path: Path | None,
              pixels: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """Train and test rows, the test labels (digits only) and the data's name.

    The digits are binarised unless ``pixels`` is ``"grey"``; a user's file is used as it is.
    """
    if path is None:
        binarize = _digit_pixels(pixels) == "binary"
        train = load_digits("train", binarize=binarize)
        test, labels = load_digits("test", return_labels=True, binarize=binarize)
        return train, test, labels, "digits"
    if pixels is not None:
        raise FreqviInputError(f"--pixels {pixels} applies to the embedded digits; --data {path} is used as "
                               "it is (binarise it beforehand for a Bernoulli log-likelihood).")
    return (*_split_file(path, "vae"), None, str(path))


def _digit_pixels(pixels: str | None) -> str:
    """``--pixels`` as given, or its default for the digits."""
    return VAE_PIXELS[0] if pixels is None else pixels


def _split_file(path: Path, command: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a user's file split at random (seed 0): ``VAE_TEST_FRACTION`` of them held out."""
    x = load_array(path)
    n_test = round(VAE_TEST_FRACTION * len(x))
    if n_test < 1 or n_test == len(x):
        raise FreqviInputError(f"{path} has {len(x)} rows; the {command} command needs at least 3 to hold "
                               f"out {VAE_TEST_FRACTION:.0%} of them for testing.")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[n_test:]], x[order[:n_test]]


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FreqviInputError(f"--out: cannot create folder {str(path)!r}: {exc.strerror or exc}.") from None


def vae_report(data_name: str, train: torch.Tensor, test: torch.Tensor, model: VAE, result: freqvi.FitResult,
               args: argparse.Namespace) -> dict:
    """The fit and its held-out evaluation as a JSON-ready dict, in :mod:`freqvi.reporting`'s convention.

    ``test_log_likelihood``: :func:`freqvi.log_likelihood` of the test rows (importance sampling,
    ``proposal="auto"``: the adaptive Student-t on the encoder), in nats: the total and the mean per test
    observation, each with its Monte-Carlo standard error, the mean's sampling standard error
    over the test observations, the proposal used and PSIS :math:`\\hat k` (the share above 0.7).
    ``test_elbo`` likewise (:func:`~freqvi.infer.evaluation.elbo_terms`), with its terms per
    observation; ``amortization_gap`` on the first ``AMORTIZATION_GAP_POINTS`` test rows.
    """
    n_test = len(test)
    loglik = freqvi.log_likelihood(model, test, num_samples=args.num_samples, seed=args.seed)
    terms = elbo_terms(model, test, num_samples=100, seed=args.seed)
    gap = amortization_gap(model, test[:AMORTIZATION_GAP_POINTS], model.guide, num_steps=args.gap_steps,
                           seed=args.seed)
    points = len(gap.encoder_elbo)
    return {
        "command": "vae",
        "data": {"name": data_name, "n_train": len(train), "n_test": n_test, "dim": train.shape[1],
                 **({"pixels": _digit_pixels(getattr(args, "pixels", None))}
                    if data_name == "digits" else {})},
        "model": {"class": "VAE", "data_dim": model.data_dim, "latent_dim": model.latent_dim,
                  "hidden": list(model.hidden), "likelihood": model.likelihood},
        "test_log_likelihood": {
            **reporting.importance_estimate(loglik, n_test),
            # Bernoulli on grey levels scores a cross-entropy, not a normalised density
            "normalised": model.likelihood != "bernoulli" or bool(((test == 0) | (test == 1)).all()),
        },
        "test_elbo": {**reporting.held_out(terms.elbo, terms.standard_error, terms.per_observation, n_test),
                      "reconstruction_per_observation": terms.reconstruction / n_test,
                      "kl_per_observation": terms.kl / n_test, "analytic_kl": terms.analytic_kl,
                      "num_samples": terms.num_samples},
        "amortization_gap": {**reporting.held_out(gap.gap, gap.standard_error,
                                                  gap.optimized_elbo - gap.encoder_elbo, points),
                             "num_points": points, "optimisation_steps": args.gap_steps},
        "fit": {"estimator": args.estimator, "num_steps": result.num_steps, "best_step": result.best_step,
                "stopped_early": result.stopped_early, "wall_time": result.wall_time,
                "seconds_per_step": result.wall_time / result.num_steps, "seed": args.seed, "lr": args.lr,
                "batch_size": args.batch_size, "ema_decay": args.ema_decay,
                "validation_steps": result.validation_steps, "validation_elbo_total": result.validation_elbo},
        "conventions": reporting.conventions(),
    }


def _vae_pictures(model: VAE, test: torch.Tensor, labels: torch.Tensor | None, out: Path) -> list[Path]:
    square = math.isqrt(model.data_dim)
    if square * square != model.data_dim:
        return []  # not square images: nothing to draw
    shape = (square, square)
    paths = [plots.reconstructions(model, test, out / "reconstructions.png", image_shape=shape),
             plots.samples(model, out / "samples.png", image_shape=shape)]
    if model.latent_dim == 2:
        paths.append(plots.latent_scatter(model, test, out / "latent.png", labels))
    return paths


def format_vae_report(report: dict, out: Path) -> str:
    """The report of :func:`vae_report` as plain text: every number with its unit and standard errors."""
    data, model, fit = report["data"], report["model"], report["fit"]
    ll, terms, gap = report["test_log_likelihood"], report["test_elbo"], report["amortization_gap"]
    item = "image" if "pixels" in data else "observation"
    pixels = {"binary": " (binarised at 0.5)", "grey": " (grey levels in [0, 1])"}.get(data.get("pixels"), "")
    lines = [
        f"data            {data['name']}{pixels}: {data['n_train']} train, {data['n_test']} test, "
        f"dim = {data['dim']}",
        f"model           VAE(data_dim={model['data_dim']}, latent_dim={model['latent_dim']}, "
        f"hidden={tuple(model['hidden'])}, likelihood={model['likelihood']!r})",
        f"fit             {fit['estimator']}, {fit['num_steps']} steps, best held-out ELBO at step "
        f"{fit['best_step']}{' (stopped early)' if fit['stopped_early'] else ''}, {fit['wall_time']:.1f} s",
        f"log-likelihood  {_held_out_text(ll, item, data['n_test'])}"
        + ("" if ll["normalised"] else "; a cross-entropy, not a log-likelihood: the Bernoulli likelihood "
           "is normalised on binary data only (binarise the data, or use --likelihood "
           "continuous_bernoulli)"),
        _indented(f"importance sampling, K = {ll['num_samples']} draws per {item} from the proposal "
                  f"{ll['proposal']} built on the encoder; {reporting.pareto_k_text(ll, item)}"),
        f"ELBO            {_held_out_text(terms, item, data['n_test'])} = reconstruction "
        f"{terms['reconstruction_per_observation']:.3f} - KL {terms['kl_per_observation']:.3f}",
        f"amortisation    {_held_out_text(gap, item, gap['num_points'])}",
        _indented(f"the ELBO gained by optimising each of the {gap['num_points']} test {item}s' Gaussian "
                  f"for {gap['optimisation_steps']} steps"),
        f"written to      {out}: metrics.json{''.join(', ' + p for p in report['pictures'])}",
    ]
    return "\n".join(lines)


def _indented(text: str) -> str:
    """``text`` wrapped to continuation lines of a report, under its values' column."""
    return textwrap.fill(text, width=110, initial_indent=" " * 16, subsequent_indent=" " * 16)


def _held_out_text(entry: dict, item: str, n: int) -> str:
    """A :func:`freqvi.reporting.held_out` entry as text: the mean per ``item``, its two standard errors."""
    return reporting.with_errors(entry["mean_per_observation"], f"nats per {item}", [
        ("Monte-Carlo", entry["monte_carlo_standard_error_per_observation"]),
        (f"over the {n} test {item}s", entry.get("sampling_standard_error_per_observation", math.nan))])


# ----- the tour subcommand ---------------------------------------------------------------------
def add_tour_command(subparsers: Subparsers) -> None:
    """Adds ``freqvi tour``: the paper's whole path on the embedded data, written up as a report."""
    tour = subparsers.add_parser(
        "tour",
        help="run EM, variational EM, a VAE and a diffusion model on embedded data; write a report",
        description="The paper's path in one run: EM for a Gaussian mixture on iris (against "
        "scikit-learn), variational EM for a random-intercept logistic GLMM (against the quadrature "
        "MLE), a VAE on the 8x8 digits (held-out log-likelihood) and a diffusion model on two moons "
        "(NLL bound, samples). Writes report.html, report.md, metrics.json and the figures to --out. "
        "A few minutes on a laptop CPU; --quick in under a minute.",
    )
    tour.add_argument("--quick", action="store_true",
                      help="smaller budgets: the same stages in under a minute")
    _add_run_arguments(tour, Path("freqvi-tour"))
    tour.set_defaults(run=run_tour_command)


def run_tour_command(args: argparse.Namespace) -> int:
    """Runs :func:`freqvi.tour.run_tour` and prints where the report is."""
    from freqvi.tour import run_tour  # imports scikit-learn's mixture, needed by this command only

    _make_folder(args.out)
    report = run_tour(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet)
    print(f"report: {report.resolve()}\n(also {report.with_suffix('.md').name}, metrics.json and the "
          f"figures in {args.out})")
    return 0


# ----- the diffusion subcommand ----------------------------------------------------------------
DIFFUSION_DATA = {"moons": load_moons, "swiss_roll": load_swiss_roll,
                  "digits": lambda split: 2 * load_digits(split) - 1}
#: --estimator -> (the estimator's name, its options as the pairs of Recipe.loss_options)
DIFFUSION_ESTIMATORS = {"time_subsampled": ("time_subsampled", (("time_sampling", "uniform"),)),
                        "importance": ("time_subsampled", (("time_sampling", "importance"),)),
                        "simple": ("simple", ()), "trace": ("trace", ())}
#: --estimator's default: the name of the recipe's estimator
DIFFUSION_ESTIMATOR = next(name for name, (loss, options) in DIFFUSION_ESTIMATORS.items()
                           if (loss, options) == (DIFFUSION.loss, DIFFUSION.loss_options))


def add_diffusion_command(subparsers: Subparsers) -> None:
    """Adds ``freqvi diffusion``: a Gaussian diffusion fitted by SVI, its held-out bound and samples."""
    diffusion = subparsers.add_parser(
        "diffusion",
        help="fit a denoising diffusion model and write its held-out bound, sample metrics and pictures",
        description="Fit a Gaussian diffusion model (freqvi.models.GaussianDiffusion: the reverse chain as "
        "the model, the forward noising chain as the guide) by maximum likelihood through its ELBO "
        "(freqvi.fit), then evaluate it on the held-out split: the full-chain ELBO as an NLL bound in "
        "nats and bits per dimension (every t, Gaussian decoder), against a fitted Gaussian's exact NLL; "
        "for 2-D data the energy distance of samples to held-out points, against that between the two "
        "halves of the held-out split. Writes metrics.json, forward_noising.png and samples.png to --out. "
        "Data: scikit-learn's two moons or swiss roll (2-D, standardised, 2,000 train / 2,000 test), "
        "the 8x8 digits scaled to [-1, 1] (1,500 / 297), or --data, whose rows are split at random (seed 0) "
        f"into {1 - VAE_TEST_FRACTION:.0%} train and {VAE_TEST_FRACTION:.0%} test and used as they are "
        "(standardise them first).",
    )
    diffusion.add_argument("--dataset", choices=tuple(DIFFUSION_DATA), default="moons",
                           help="embedded data (default: %(default)s)")
    diffusion.add_argument("--data", metavar="PATH", type=path,
                           help="a .npy or .csv file, one observation per row, instead of --dataset")
    diffusion.add_argument("--diffusion-steps", metavar="T", type=count(), default=1000,
                           help="steps of the chain (default: %(default)s)")
    diffusion.add_argument("--schedule", choices=SCHEDULES, default="linear",
                           help="noise schedule (default: %(default)s)")
    diffusion.add_argument("--hidden", metavar="H1,H2,...", type=widths, default=(128, 128, 128),
                           help="hidden widths of the denoiser (default: 128,128,128)")
    diffusion.add_argument("--estimator", choices=tuple(DIFFUSION_ESTIMATORS), default=DIFFUSION_ESTIMATOR,
                           help="training objective: the time-subsampled ELBO with t uniform or importance-"
                           "sampled, Ho et al.'s simple loss (not a bound), or the full-chain Trace_ELBO "
                           "(default: %(default)s)")
    diffusion.add_argument("--steps", metavar="N", type=count(), default=DIFFUSION.num_steps,
                           help="training steps (default: %(default)s)")
    diffusion.add_argument("--batch-size", metavar="B", type=count(), default=DIFFUSION.batch_size,
                           help="observations per step (default: %(default)s)")
    diffusion.add_argument("--lr", type=real(), default=DIFFUSION.lr,
                           help="Adam's learning rate (default: %(default)s)")
    diffusion.add_argument("--ema-decay", metavar="D", type=real(inclusive=True, below=1.0),
                           default=DIFFUSION.average.decay,
                           help="keep an exponential moving average of the weights (freqvi.EMA, with "
                           "warm-up), evaluate and sample it; 0: the last iterate (default: %(default)s)")
    diffusion.add_argument("--samples", metavar="M", type=count(), default=1000,
                           help="model draws for the energy distance and the pictures (default: %(default)s)")
    diffusion.add_argument("--sampler", choices=SAMPLERS, default="ancestral",
                           help="ancestral (exact draws) or ddim (deterministic) (default: %(default)s)")
    diffusion.add_argument("--ddim-steps", metavar="K", type=count(), default=50,
                           help="steps of the ddim sampler (default: %(default)s)")
    _add_run_arguments(diffusion, Path("diffusion-out"))
    _add_checkpoint_arguments(diffusion, 1000, "training steps")
    diffusion.set_defaults(run=run_diffusion)


def run_diffusion(args: argparse.Namespace) -> int:
    """Fits the diffusion model that ``args`` describes, evaluates it, prints a summary, writes ``--out``."""
    recipe = diffusion_recipe(args)  # the average's decay is checked here, before any work
    if args.sampler == "ddim" and args.ddim_steps > args.diffusion_steps:
        raise FreqviInputError(f"--ddim-steps takes at most the chain's --diffusion-steps "
                               f"({args.diffusion_steps}) steps; got {args.ddim_steps}.")
    if args.data is None:
        load = DIFFUSION_DATA[args.dataset]
        (train, test), data_name = (load("train"), load("test")), args.dataset
    else:
        (train, test), data_name = _split_file(args.data, "diffusion"), str(args.data)
    _make_folder(args.out)
    torch.manual_seed(args.seed)
    with intra_op_threads(entries=step_entries(train, args.batch_size)):
        model = GaussianDiffusion(train.shape[1], args.diffusion_steps, args.schedule, hidden=args.hidden)
        result = recipe.fit(model, train, seed=args.seed, progress=not args.quiet, **_checkpointing(args))
        _stop_if_interrupted(result, args)
        ddim = {"method": "ddim", "num_steps": args.ddim_steps} if args.sampler == "ddim" else {}
        samples = model.sample(args.samples, seed=args.seed, **ddim)
        report = diffusion_report(data_name, train, test, model, result, samples, args)
        report["pictures"] = [p.name for p in _diffusion_pictures(model, test, samples, args.out)]
        _write_json(report, args.out / "metrics.json")
        print(format_diffusion_report(report, args.out))
    return 0


def diffusion_recipe(args: argparse.Namespace) -> Recipe:
    """:data:`freqvi.infer.recipes.DIFFUSION` with the fields the arguments set (their defaults are its own).

    :raises ~freqvi.errors.FreqviInputError: an ``--ema-decay`` outside [0, 1) (0: no average).
    """
    loss, loss_options = DIFFUSION_ESTIMATORS[args.estimator]
    average = replace(DIFFUSION.average, decay=args.ema_decay) if args.ema_decay else None
    return replace(DIFFUSION, loss=loss, loss_options=loss_options, lr=args.lr, batch_size=args.batch_size,
                   num_steps=args.steps, average=average)


def diffusion_report(data_name: str, train: torch.Tensor, test: torch.Tensor, model: GaussianDiffusion,
                     result: freqvi.FitResult, samples: torch.Tensor, args: argparse.Namespace) -> dict:
    """The fit and its held-out evaluation as a JSON-ready dict, in :mod:`freqvi.reporting`'s convention.

    ``test_nll_bound``: :func:`~freqvi.infer.diffusion.diffusion_bound` of the test rows, an upper
    bound on their negative log-likelihood (a density's, so it can be negative), in nats and bits
    per dimension, each with its sampling standard error over the test rows; the fitted Gaussian's
    exact NLL beside it.
    """
    bound = diffusion_bound(model, test, seed=args.seed)
    report = {
        "command": "diffusion",
        "data": {"name": data_name, "n_train": len(train), "n_test": len(test), "dim": train.shape[1]},
        "model": {"class": "GaussianDiffusion", "num_steps": model.num_steps, "schedule": args.schedule,
                  "hidden": list(args.hidden), "reverse_variance": model.reverse_variance_type},
        "test_nll_bound": {"nats_per_dim": bound.nats_per_dim,
                           "sampling_standard_error_nats_per_dim": bound.standard_error,
                           "bits_per_dim": bound.bits_per_dim,
                           "sampling_standard_error_bits_per_dim": bound.standard_error / math.log(2),
                           "num_observations": len(test),
                           "gaussian_nats_per_dim": _gaussian_baseline(train, test)},
        "fit": {"estimator": args.estimator, "num_steps": result.num_steps, "wall_time": result.wall_time,
                "seconds_per_step": result.wall_time / result.num_steps, "seed": args.seed, "lr": args.lr,
                "batch_size": args.batch_size, "ema_decay": args.ema_decay},
        "conventions": reporting.conventions(),
    }
    if train.shape[1] == 2:
        half = min(len(samples), len(test) // 2)
        report["energy_distance"] = {
            "samples_vs_test": energy_distance(samples[:half], test[:half]),
            "test_half_vs_half": energy_distance(test[half:2 * half], test[:half]),
            "num_points": half, "sampler": args.sampler}
    return report


def _gaussian_baseline(train: torch.Tensor, test: torch.Tensor) -> float | None:
    """The fitted Gaussian's held-out NLL per dimension; ``None`` if degenerate (digits' blank pixels)."""
    try:
        return gaussian_nll_per_dim(train, test)
    except FreqviInputError:
        return None


def _diffusion_pictures(model: GaussianDiffusion, test: torch.Tensor, samples: torch.Tensor,
                        out: Path) -> list[Path]:
    """2-D data: noising scatters and samples against data; square images in [-1, 1]: image grids."""
    noising = out / "forward_noising.png"
    if model.data_dim == 2:
        return [plots.forward_noising(model, test[:500], noising),
                plots.samples_vs_data(samples, test[:len(samples)], out / "samples.png")]
    square = math.isqrt(model.data_dim)
    if square * square != model.data_dim:
        return []  # neither points nor images: nothing to draw
    shape = (square, square)
    return [plots.forward_noising(model, test[:10], noising, image_shape=shape),
            plots.image_grid((samples[:50] + 1) / 2, out / "samples.png", image_shape=shape,
                             title="samples from the model")]


def _bound_text(nll: dict) -> str:
    """The bound in nats per dimension with its sampling standard error."""
    return reporting.with_errors(nll["nats_per_dim"], "nats/dim", [
        (f"over the {nll['num_observations']} test points", nll["sampling_standard_error_nats_per_dim"])],
        digits=4)


def format_diffusion_report(report: dict, out: Path) -> str:
    """The report of :func:`diffusion_report` as plain text."""
    data, model, fit, nll = report["data"], report["model"], report["fit"], report["test_nll_bound"]
    lines = [
        f"data            {data['name']}: {data['n_train']} train, {data['n_test']} test, "
        f"dim = {data['dim']}",
        f"model           GaussianDiffusion(T={model['num_steps']}, schedule={model['schedule']!r}, "
        f"hidden={tuple(model['hidden'])})",
        f"fit             {fit['estimator']}, {fit['num_steps']} steps, {fit['wall_time']:.1f} s",
        f"NLL bound       {_bound_text(nll)} = {nll['bits_per_dim']:.4f} bits/dim (s.e. "
        f"{nll['sampling_standard_error_bits_per_dim']:.4f})",
        "                the full-chain negative ELBO of the test points: an upper bound on their NLL",
        "fitted Gaussian " + ("degenerate (singular covariance)" if nll["gaussian_nats_per_dim"] is None
                              else f"{nll['gaussian_nats_per_dim']:.4f} nats/dim (its exact NLL on the test "
                              "points)"),
    ]
    if "energy_distance" in report:
        ed = report["energy_distance"]
        lines.append(f"energy distance {ed['samples_vs_test']:.4f} samples vs test; "
                     f"{ed['test_half_vs_half']:.4f} between test halves ({ed['num_points']} points each)")
    lines.append(f"written to      {out}: metrics.json{''.join(', ' + p for p in report['pictures'])}")
    return "\n".join(lines)


# ----- the command line ------------------------------------------------------------------------
COMMANDS: dict[str, Callable[[Subparsers], None]] = {
    "tour": add_tour_command, "em": add_em_command, "vae": add_vae_command,
    "diffusion": add_diffusion_command,
}


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

    Every option's value is checked as the command line is parsed: a bad one is a usage error
    (argparse's usage line and message, exit status 2). The places the command writes to are checked
    next (``freqvi.cli_options.check_outputs``), then the command runs. Errors that freqvi raises
    on purpose are printed as one line, ``freqvi: error: <message>``, on stderr: exit status 2 for
    input that freqvi refused (:class:`~freqvi.errors.FreqviInputError`), 1 for a run that failed
    (another :class:`~freqvi.errors.FreqviError`, e.g. a diverged fit or a checkpoint that cannot be
    written). Ctrl-C prints ``freqvi: interrupted`` and returns 130. Warnings are printed before that
    line, one per line, ``freqvi: warning: <message>``.
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
            check_outputs(args)
            with intra_op_threads(args.threads):
                status = args.run(args)
        except FreqviError as exc:
            status, last = _failure_status(exc), f"freqvi: error: {_error_message(exc)}"
        except KeyboardInterrupt as exc:
            status, last = EXIT_INTERRUPTED, "freqvi: interrupted" + (f": {exc}" if str(exc) else "")
        else:
            last = None
    with _ctrl_c_ignored():  # a second Ctrl-C while the first is reported
        _print_warnings(caught)
        if last is not None:
            print(last, file=sys.stderr)
    return status


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """Ignores Ctrl-C in the block (main thread only, where handlers can be set), then restores it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _failure_status(exc: FreqviError) -> int:
    """2 for input freqvi refused (a usage error, as argparse's), 1 for a run that failed."""
    return EXIT_ERROR if isinstance(exc, FreqviInputError) else EXIT_FAILURE


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
    """Each distinct warning once (the data's checks run more than once: by the command, by the driver)."""
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        print(f"freqvi: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

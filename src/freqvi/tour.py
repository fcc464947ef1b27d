"""``freqvi tour``: the paper's whole path on embedded data, written up as a report a person opens.

One stage per step of the paper, each fitting a model/guide pair with the same
drivers and returning a :class:`Section`:

1. EM for a Gaussian mixture (iris), against scikit-learn, with BIC over K;
2. variational EM for a random-intercept logistic GLMM (simulated from known
   parameters), against the quadrature MLE;
3. a VAE on the 8x8 digits: held-out log-likelihood by importance sampling;
4. a diffusion model on two moons: the ELBO as an NLL bound, samples.

The report is rendered from the sections twice, as Markdown and as HTML, beside
the figures (PNG) and every number in ``metrics.json``.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure

import freqvi
from freqvi import plots
from freqvi.datasets import load_digits, load_iris, load_moons
from freqvi.infer.diffusion import diffusion_bound, energy_distance, gaussian_nll_per_dim
from freqvi.infer.recipes import DIFFUSION
from freqvi.infer.threads import intra_op_threads
from freqvi.models import VAE, GaussianDiffusion, GaussianMixture, RandomInterceptLogistic


@dataclass(frozen=True)
class Budget:
    """How much work each stage does; :data:`BUDGETS` holds the full and the quick tour's."""

    glmm_groups: int
    glmm_steps: int
    vae_steps: int
    vae_importance_samples: int
    diffusion_steps: int
    diffusion_samples: int


BUDGETS = {
    "full": Budget(glmm_groups=200, glmm_steps=1500, vae_steps=4000, vae_importance_samples=1000,
                   diffusion_steps=15000, diffusion_samples=1000),
    "quick": Budget(glmm_groups=100, glmm_steps=300, vae_steps=400, vae_importance_samples=100,
                    diffusion_steps=2000, diffusion_samples=300),
}


@dataclass
class Section:
    """One stage's part of the report: prose, a table of results, figures and raw metrics.

    :ivar rows: ``(quantity, value)`` pairs, values already formatted.
    :ivar figures: ``(file name, caption)`` of PNGs in the output folder.
    :ivar metrics: the stage's numbers, JSON-ready.
    """

    title: str
    paragraphs: list[str]
    rows: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


Stage = Callable[[Path, Budget, int, bool], Section]


# ----- 1. EM -----------------------------------------------------------------------------------
def mixture_stage(out: Path, budget: Budget, seed: int, progress: bool) -> Section:
    """EM for a three-component Gaussian mixture on iris."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture  # slow import, only here

    x = load_iris(torch.float64)
    model = GaussianMixture(3, 4)
    result = freqvi.em(model, x, tol=1e-8, seed=seed, progress=progress)
    loglik = freqvi.log_likelihood(model, x).total
    sk = SkGaussianMixture(3, covariance_type="full", n_init=10, tol=1e-8, random_state=seed).fit(x.numpy())
    sk_loglik = float(sk.score(x.numpy())) * len(x)
    table = freqvi.compare({k: GaussianMixture(k, 4) for k in range(1, 6)}, x, seed=seed, tol=1e-8)
    best_k = int(table.index[0])
    path = _plot(out / "em_ascent.png", "EM on iris: the log-likelihood never decreases",
                 "iteration", "log-likelihood",
                 [(range(len(result.log_likelihood)), result.log_likelihood, "freqvi.em", "-o")],
                 hline=(sk_loglik, "scikit-learn (best of 10 starts)"))
    bic = _plot(out / "em_bic.png", "BIC of mixtures with K components", "K", "BIC",
                [(table.index.sort_values(), table["bic"].sort_index(), "BIC", "-o")])
    return Section(
        "EM for a Gaussian mixture (iris)",
        ["The mixture is a Pyro model (weights, means and covariances as parameters, a discrete "
         "component per flower) and its exact posterior is the guide: freqvi.em records the guide's "
         "responsibilities at the current parameters (E-step) and maximises the expected complete "
         "log-likelihood in closed form (M-step). Each iteration can only raise the log-likelihood.",
         "scikit-learn's GaussianMixture, fitted independently from ten k-means starts, is the reference; "
         "BIC (freqvi.compare) chooses the number of components."],
        [("log-likelihood, freqvi.em",
          f"{loglik:.4f} ({result.num_iter} iterations, {result.wall_time:.2f} s)"),
         ("log-likelihood, scikit-learn", f"{sk_loglik:.4f}"),
         ("difference per observation", f"{(loglik - sk_loglik) / len(x):.2e}"),
         ("smallest log-likelihood step", f"{min(np.diff(result.log_likelihood)):.2e} (never negative)"),
         ("BIC chooses", f"K = {best_k}")],
        [(path.name, "The log-likelihood at each EM iteration, and scikit-learn's optimum."),
         (bic.name, "BIC for K = 1..5 components; smaller is better.")],
        {"log_likelihood": loglik, "sklearn_log_likelihood": sk_loglik, "num_iter": result.num_iter,
         "log_likelihood_path": result.log_likelihood, "bic": table["bic"].sort_index().to_dict(),
         "bic_choice": best_k},
    )


# ----- 2. variational EM -----------------------------------------------------------------------
GLMM_TRUTH = {"beta": (-0.5, 1.0), "sigma": 1.0}


def glmm_stage(out: Path, budget: Budget, seed: int, progress: bool) -> Section:
    """Variational EM for a random-intercept logistic regression, against the quadrature MLE."""
    data = RandomInterceptLogistic.simulate(budget.glmm_groups, 10, **GLMM_TRUTH, seed=seed)
    mle = RandomInterceptLogistic(2)
    freqvi.maximize_likelihood(mle, data)
    vi = RandomInterceptLogistic(2)
    decay = (1e-3 / 0.05) ** (1 / budget.glmm_steps)  # Adam's step decays from 0.05 to 1e-3
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": decay, "clip_norm": math.inf})
    fit = freqvi.fit(vi, data, loss="mean_field", optim=optim, num_steps=budget.glmm_steps, seed=seed,
                     progress=progress)
    elbo = freqvi.elbo_terms(vi, data, num_samples=200, seed=seed)
    fits = {"quadrature MLE": mle, "variational EM": vi}
    loglik = {name: freqvi.log_likelihood(model, data).total for name, model in fits.items()}
    tables = {name: freqvi.observed_information(model, data).summary() for name, model in fits.items()}
    window = min(50, len(fit.elbo))
    smooth = np.convolve(fit.elbo, np.ones(window) / window, mode="valid")
    path = _plot(out / "glmm_elbo.png", "Variational EM: the ELBO stays below the log-likelihood", "SVI step",
                 "nats", [(range(window, len(fit.elbo) + 1), smooth, f"ELBO (mean of {window} steps)", "-")],
                 hline=(loglik["quadrature MLE"], "log-likelihood at the MLE (quadrature)"),
                 ylim=(loglik["quadrature MLE"] - 15, loglik["quadrature MLE"] + 3))
    rows = [(f"{name}: {entry}", f"{t.loc[entry, 'estimate']:.3f} ({t.loc[entry, 'std_err']:.3f})")
            for name, t in tables.items() for entry in t.index]
    return Section(
        "Variational EM for a GLMM (simulated, known truth)",
        [f"{budget.glmm_groups} groups of 10 binary responses with a Gaussian random intercept, simulated "
         f"with beta = {GLMM_TRUTH['beta']} and sigma = {GLMM_TRUTH['sigma']}. The posterior of each "
         "intercept has no closed form, so the E-step uses the best Gaussian per group (LocalMeanField) "
         "and freqvi.fit maximises the ELBO over the parameters and the guide together. The likelihood "
         "is a product of one-dimensional integrals, so adaptive Gauss-Hermite quadrature gives the exact "
         "MLE (freqvi.maximize_likelihood) to judge the variational estimate against.",
         "Estimates with standard errors (observed information of the exact likelihood) in brackets. The "
         "ELBO at the variational fit sits below the log-likelihood by the KL divergence from the Gaussian "
         "guides to the skewed posteriors; the variational estimate's bias against the MLE does not shrink "
         "as groups are added."],
        [*rows,
         ("log-likelihood at the MLE", f"{loglik['quadrature MLE']:.3f}"),
         ("log-likelihood at theta_VI", f"{loglik['variational EM']:.3f}"),
         ("ELBO at theta_VI", f"{elbo.elbo:.3f} (Monte-Carlo s.e. {elbo.standard_error:.3f})")],
        [(path.name, "The ELBO during variational EM (running mean of one-draw estimates) and the "
                     "exact log-likelihood at the MLE.")],
        {"truth": GLMM_TRUTH, "log_likelihood": loglik, "elbo": elbo.elbo, "elbo_standard_error":
         elbo.standard_error, "estimates": {name: t["estimate"].to_dict() for name, t in tables.items()},
         "standard_errors": {name: t["std_err"].to_dict() for name, t in tables.items()},
         "num_steps": fit.num_steps},
    )


# ----- 3. VAE ----------------------------------------------------------------------------------
VAE_VALIDATION = 200  # training images held back for early stopping


def vae_stage(out: Path, budget: Budget, seed: int, progress: bool) -> Section:
    """A variational autoencoder on the 8x8 digits, judged by its held-out log-likelihood."""
    # binarised, so that the Bernoulli likelihood is a normalised density and log p(x) a log-likelihood
    train, test = ((load_digits(split) > 0.5).float() for split in ("train", "test"))
    train, validation = train[:-VAE_VALIDATION], train[-VAE_VALIDATION:]
    model = VAE(64, latent_dim=8)
    fit = freqvi.fit(model, train, loss="mean_field", lr=2e-3, num_steps=budget.vae_steps,
                     batch_size=128, seed=seed, progress=progress, validation_data=validation,
                     eval_every=max(budget.vae_steps // 10, 1))
    loglik = freqvi.log_likelihood(model, test, num_samples=budget.vae_importance_samples, seed=seed)
    terms = freqvi.elbo_terms(model, test, num_samples=100, seed=seed)
    n, n_train = len(test), len(train)
    curve = _plot(out / "vae_elbo.png", "VAE training", "step", "ELBO per observation",
                  [(range(1, len(fit.elbo) + 1), np.asarray(fit.elbo) / n_train, "training (one draw)", "-"),
                   (fit.validation_steps, np.asarray(fit.validation_elbo) / len(validation), "validation",
                    "-o")])
    pictures = [plots.reconstructions(model, test, out / "vae_reconstructions.png"),
                plots.samples(model, out / "vae_samples.png")]
    return Section(
        "A variational autoencoder (digits)",
        ["A VAE is amortised VI with a neural decoder: z ~ N(0, I), each pixel (binarised at 0.5) Bernoulli "
         "given a decoder network of z, and an encoder network as the guide. The decoder's weights are the "
         "parameters theta, estimated by maximum likelihood through the ELBO (analytic KL); the encoder "
         f"only serves the approximation. Fitted on {len(train)} training images (early stopping on "
         f"{len(validation)} more), judged on {len(test)} held-out test images.",
         "The held-out log-likelihood is estimated by importance sampling with the encoder as proposal; "
         "PSIS k-hat below 0.7 says an image's estimate can be trusted, and the table says for how many "
         "it is not (a heavier-tailed proposal would help those). It exceeds the ELBO by the KL from the "
         "encoder's q to the exact posterior."],
        [("held-out log-likelihood per image",
          f"{loglik.total / n:.3f} (s.e. {loglik.standard_error / n:.3f}, K = {loglik.num_samples}, "
          f"max k-hat {loglik.max_pareto_k:.2f}, above 0.7 for {loglik.num_heavy_tailed / n:.0%} of images"
          + (f", not estimable for {loglik.num_unestimable / n:.0%} (tied or too few weights)"
             if loglik.num_unestimable else "") + ")"),
         ("held-out ELBO per image", f"{terms.elbo / n:.3f} = reconstruction {terms.reconstruction / n:.3f} "
          f"- KL {terms.kl / n:.3f}"),
         ("training", f"{fit.num_steps} steps of 128 images, {fit.wall_time:.1f} s, best validation ELBO at "
          f"step {fit.best_step}")],
        [(curve.name, "The ELBO per image during training, and on the validation images."),
         (pictures[0].name, "Held-out images (top) and their reconstructions (bottom)."),
         (pictures[1].name, "Images generated by the fitted model (decoder means).")],
        {"test_log_likelihood_per_observation": loglik.total / n,
         "test_log_likelihood_standard_error": loglik.standard_error / n,
         "pareto_k_max": loglik.max_pareto_k,
         "pareto_k_fraction_above_0.7": loglik.num_heavy_tailed / n,
         "pareto_k_fraction_unestimable": loglik.num_unestimable / n,
         "test_elbo_per_observation": terms.elbo / n,
         "test_elbo_standard_error": terms.standard_error / n,
         "reconstruction_per_observation": terms.reconstruction / n, "kl_per_observation": terms.kl / n,
         "num_steps": fit.num_steps, "best_step": fit.best_step, "wall_time": fit.wall_time},
    )


# ----- 4. diffusion ----------------------------------------------------------------------------
def diffusion_stage(out: Path, budget: Budget, seed: int, progress: bool) -> Section:
    """A denoising diffusion model on two moons: a VAE whose latent is the noising chain."""
    train, test = load_moons("train"), load_moons("test")
    torch.manual_seed(seed)  # the denoiser's initial weights
    model = GaussianDiffusion(2, num_steps=1000)
    fit = DIFFUSION.fit(model, train, num_steps=budget.diffusion_steps, seed=seed, progress=progress)
    bound = diffusion_bound(model, test, seed=seed)
    gaussian = gaussian_nll_per_dim(train, test)
    half = min(budget.diffusion_samples, len(test) // 2)
    samples = model.sample(half, seed=seed)
    distance, floor = energy_distance(samples, test[:half]), energy_distance(test[half:2 * half], test[:half])
    window = min(max(100, len(fit.elbo) // 20), len(fit.elbo))  # one-step t-draws are noisy
    smooth = np.convolve(fit.elbo, np.ones(window) / window, mode="valid") / (len(train) * 2)
    curve = _plot(out / "diffusion_elbo.png", "Diffusion training (time-subsampled ELBO)", "step",
                  "ELBO per dimension", [(range(window, len(fit.elbo) + 1), smooth,
                                          f"training (mean of {window} steps)", "-")],
                  hline=(-bound.nats_per_dim, "held-out ELBO, every t"))
    pictures = [plots.forward_noising(model, test[:500], out / "diffusion_noising.png", seed=seed),
                plots.samples_vs_data(samples, test[:half], out / "diffusion_samples.png")]
    return Section(
        "A diffusion model (two moons)",
        ["A denoising diffusion model is a VAE whose latent is the chain x_1, ..., x_T (T = 1000): the "
         "model is the learned reverse chain, with a network predicting the noise, and the guide is the "
         "fixed forward noising, with no parameters. It is fitted by maximising the same ELBO, estimated "
         "without bias by one random time step per observation with the Gaussian KL of that step in "
         "closed form (loss='time_subsampled'), at a cost that does not grow with T. The model evaluated "
         "and sampled is an exponential moving average of the weights (average='ema', decay 0.999), "
         "which smooths away the noise of the last steps.",
         "On held-out points the full ELBO, every one of the T terms evaluated, bounds the negative "
         "log-likelihood per dimension; a Gaussian fitted to the training points is the baseline. The "
         "energy distance of model samples to held-out points is set against its noise floor: the "
         "distance between two halves of the held-out points."],
        [("held-out NLL bound",
          f"{bound.nats_per_dim:.3f} nats per dimension (s.e. {bound.standard_error:.3f})"),
         ("fitted Gaussian's exact NLL", f"{gaussian:.3f} nats per dimension"),
         ("energy distance, samples to held-out", f"{distance:.4f} ({half} points each)"),
         ("energy distance, held-out half to half", f"{floor:.4f}"),
         ("training", f"{fit.num_steps} steps of 256 points, {fit.wall_time:.1f} s")],
        [(curve.name, "The time-subsampled ELBO during training and the full held-out ELBO."),
         (pictures[0].name, "The forward chain q(x_t | x_0) on held-out points at several t."),
         (pictures[1].name, "Held-out points and samples from the fitted model (ancestral sampling).")],
        {"nll_bound_nats_per_dim": bound.nats_per_dim, "nll_bound_standard_error": bound.standard_error,
         "bits_per_dim": bound.bits_per_dim, "gaussian_nll_nats_per_dim": gaussian,
         "energy_distance": distance, "energy_distance_floor": floor, "num_points": half,
         "num_steps": fit.num_steps, "wall_time": fit.wall_time},
    )


STAGES: list[Stage] = [mixture_stage, glmm_stage, vae_stage, diffusion_stage]


# ----- the report ------------------------------------------------------------------------------
def run_tour(out: Path, *, quick: bool = False, seed: int = 0, progress: bool = True,
             num_threads: int | None = None) -> Path:
    """Runs every stage, writes ``report.md``, ``report.html``, ``metrics.json`` and the PNGs to ``out``.

    Prints one line as each stage starts; returns the HTML report's path.

    :param num_threads: torch's intra-op threads for the whole tour, as the drivers'
        ``num_threads`` (:mod:`freqvi.infer.threads`): by default ``$FREQVI_NUM_THREADS``, else
        the policy's count for its largest data set (1,500 x 64 digits), while each driver
        inside sizes its own steps; the caller's count is restored afterwards.
    """
    budget = BUDGETS["quick" if quick else "full"]
    out.mkdir(parents=True, exist_ok=True)
    sections, start = [], time.perf_counter()
    largest = max(x.numel() for x in (load_iris(), load_digits("train"), load_moons("train")))
    with intra_op_threads(num_threads, entries=largest) as threads:
        for number, stage in enumerate(STAGES, 1):
            print(f"[{number}/{len(STAGES)}] {stage.__doc__.splitlines()[0]}", flush=True)
            stage_start = time.perf_counter()
            section = stage(out, budget, seed, progress)
            section.metrics["seconds"] = time.perf_counter() - stage_start
            sections.append(section)
    versions = {"freqvi": freqvi.__version__, "pyro": pyro.__version__, "torch": torch.__version__}
    header = {"mode": "quick" if quick else "full", "seed": seed, "seconds": time.perf_counter() - start,
              "threads": threads, "versions": versions}
    metrics = {**header, "sections": {s.title: s.metrics for s in sections}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(render_markdown(sections, header))
    report = out / "report.html"
    report.write_text(render_html(sections, header))
    return report


INTRO = ("EM, variational EM, a variational autoencoder and a diffusion model, fitted as one method: "
         "each is a Pyro model/guide pair whose parameters theta are estimated by maximising the ELBO, "
         "with the guide as the E-step.")


def _subtitle(header: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    return (f"{header['mode']} tour, seed {header['seed']}, {header['seconds']:.0f} s on this machine "
            f"({header['threads']} torch thread(s); {versions}).")


def render_markdown(sections: list[Section], header: dict) -> str:
    """The report as Markdown: a heading, prose, a two-column table and the figures per section."""
    lines = ["# The freqvi tour", "", INTRO, "", _subtitle(header), ""]
    for number, s in enumerate(sections, 1):
        lines += [f"## {number}. {s.title}", "", *(p + "\n" for p in s.paragraphs), "| quantity | value |",
                  "| --- | --- |", *(f"| {q} | {v} |" for q, v in s.rows), ""]
        lines += [f"![{caption}]({name})\n\n*{caption}*\n" for name, caption in s.figures]
    return "\n".join(lines)


def render_html(sections: list[Section], header: dict) -> str:
    """The same report as a self-contained HTML page that loads the PNGs beside it."""
    e = html.escape
    body = [f"<h1>The freqvi tour</h1><p>{e(INTRO)}</p><p><small>{e(_subtitle(header))}</small></p>"]
    for number, s in enumerate(sections, 1):
        body.append(f"<h2>{number}. {e(s.title)}</h2>" + "".join(f"<p>{e(p)}</p>" for p in s.paragraphs))
        body.append("<table>" + "".join(f"<tr><th>{e(q)}</th><td>{e(v)}</td></tr>" for q, v in s.rows)
                    + "</table>")
        body += [f'<figure><img src="{e(name)}" alt="{e(caption)}">'
                 f"<figcaption>{e(caption)}</figcaption></figure>" for name, caption in s.figures]
    style = ("body{font-family:sans-serif;max-width:58em;margin:2em auto;line-height:1.45;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;"
             "text-align:left}th{background:#f4f4f4;font-weight:normal}img{max-width:100%}"
             "figcaption{font-size:.9em;color:#555}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>freqvi tour</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _plot(path: Path, title: str, xlabel: str, ylabel: str, lines, *, hline=None, ylim=None) -> Path:
    """A line plot of ``lines`` ``[(x, y, label, style)]``, with an optional labelled horizontal line."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    for x, y, label, style in lines:
        ax.plot(list(x), list(y), style, label=label, markersize=3, lw=1.2)
    if hline is not None:
        ax.axhline(hline[0], color="k", ls=":", label=hline[1])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **({"ylim": ylim} if ylim else {}))
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _json_default(value):
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")

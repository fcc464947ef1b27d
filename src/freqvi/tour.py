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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import freqvi
from freqvi import plots, reporting
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
    vae_ais_temperatures: int
    diffusion_steps: int
    diffusion_samples: int


BUDGETS = {
    "full": Budget(glmm_groups=200, glmm_steps=1500, vae_steps=4000, vae_importance_samples=5000,
                   vae_ais_temperatures=300, diffusion_steps=15000, diffusion_samples=1000),
    "quick": Budget(glmm_groups=100, glmm_steps=300, vae_steps=400, vae_importance_samples=100,
                    vae_ais_temperatures=20, diffusion_steps=2000, diffusion_samples=300),
}


@dataclass
class Section:
    """One stage's part of the report: its headline, prose, a table of results, figures and raw metrics.

    :ivar summary: one sentence with the stage's headline numbers and their units, for the top.
    :ivar rows: ``(quantity, value)`` pairs, values already formatted with their units.
    :ivar figures: ``(file name, caption)`` of PNGs in the output folder.
    :ivar metrics: the stage's numbers, JSON-ready, in :mod:`freqvi.reporting`'s convention.
    """

    title: str
    summary: str
    paragraphs: list[str]
    rows: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


Stage = Callable[[Path, Budget, int, bool], Section]


# ----- 1. EM -----------------------------------------------------------------------------------
MIXTURE_K = 3  # the number of iris species


def mixture_stage(out: Path, budget: Budget, seed: int, progress: bool) -> Section:
    """EM for a three-component Gaussian mixture on iris."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture  # slow import, only here

    x = load_iris(torch.float64)
    n = len(x)
    model = GaussianMixture(MIXTURE_K, 4)
    result = freqvi.em(model, x, tol=1e-8, seed=seed, progress=progress)
    loglik = freqvi.log_likelihood(model, x).total
    sk = SkGaussianMixture(MIXTURE_K, covariance_type="full", n_init=10, tol=1e-8,
                           random_state=seed).fit(x.numpy())
    sk_loglik = float(sk.score(x.numpy())) * n
    table = freqvi.compare({k: GaussianMixture(k, 4) for k in range(1, 6)}, x, seed=seed, tol=1e-8)
    best_k = int(table.index[0])
    path = _plot(out / "em_ascent.png", "EM on iris: the log-likelihood at each iteration",
                 "EM iteration", f"log-likelihood (nats, total over {n} flowers)",
                 [(range(len(result.log_likelihood)), result.log_likelihood, "freqvi.em", "-o")],
                 hline=(sk_loglik, "scikit-learn (best of 10 starts)"), integer_x=True)
    bic_table = table.sort_index()
    bic = _plot(out / "em_bic.png", "BIC of mixtures with K components (smaller is better)",
                "K (number of components)", "BIC = -2 log-likelihood + k log n",
                [(bic_table.index, bic_table["bic"], "BIC", "-o")], integer_x=True,
                marks=[(best_k, float(table.loc[best_k, "bic"]), f"BIC's choice, K = {best_k}"),
                       (MIXTURE_K, float(table.loc[MIXTURE_K, "bic"]), f"fitted above, K = {MIXTURE_K}")])
    return Section(
        "EM for a Gaussian mixture (iris)",
        f"EM on iris (K = {MIXTURE_K}) reaches a log-likelihood of {loglik:.4f} nats, scikit-learn's best of "
        f"ten starts to {abs(loglik - sk_loglik) / n:.1e} nats per flower; BIC prefers K = {best_k}.",
        ["The mixture is a Pyro model (weights, means and covariances as parameters, a discrete "
         "component per flower) and its exact posterior is the guide: freqvi.em records the guide's "
         "responsibilities at the current parameters (E-step) and maximises the expected complete "
         "log-likelihood in closed form (M-step). Each iteration can only raise the log-likelihood.",
         "scikit-learn's GaussianMixture, fitted independently from ten k-means starts, is the reference; "
         "BIC (freqvi.compare) weighs the number of components.",
         _bic_paragraph(table, best_k, n)],
        [("log-likelihood, freqvi.em",
          f"{loglik:.4f} nats, total over {n} flowers (exact; {result.num_iter} iterations, "
          f"{result.wall_time:.2f} s)"),
         ("log-likelihood, scikit-learn", f"{sk_loglik:.4f} nats"),
         ("difference per flower", f"{(loglik - sk_loglik) / n:.2e} nats"),
         ("smallest log-likelihood step", f"{min(np.diff(result.log_likelihood)):.2e} nats (never negative)"),
         ("BIC chooses", f"K = {best_k} (BIC {table.loc[best_k, 'bic']:.1f} against "
                         f"{table.loc[MIXTURE_K, 'bic']:.1f} for the K = {MIXTURE_K} fitted above)")],
        [(path.name, "The log-likelihood at each EM iteration, and scikit-learn's optimum."),
         (bic.name, "BIC for K = 1..5 components; smaller is better.")],
        {"log_likelihood": {"total": loglik, "mean_per_observation": loglik / n, "method": "exact"},
         "sklearn_log_likelihood": {"total": sk_loglik}, "num_iter": result.num_iter,
         "log_likelihood_path_total": result.log_likelihood, "bic": table["bic"].sort_index().to_dict(),
         "bic_choice": best_k, "fitted_k": MIXTURE_K},
    )


def _bic_paragraph(table, best_k: int, n: int) -> str:
    """Why the fit has K = 3 components while BIC prefers another K, in the table's numbers."""
    if best_k == MIXTURE_K:
        return f"BIC agrees with the {MIXTURE_K} species."
    gain = table.loc[MIXTURE_K, "log_likelihood"] - table.loc[best_k, "log_likelihood"]
    extra = int(table.loc[MIXTURE_K, "num_parameters"] - table.loc[best_k, "num_parameters"])
    return (f"The fit uses K = {MIXTURE_K}, the number of species, yet BIC prefers K = {best_k}: BIC charges "
            f"each parameter (log n)/2 = {math.log(n) / 2:.2f} nats of log-likelihood, and going from "
            f"K = {best_k} to {MIXTURE_K} raises the log-likelihood by {gain:.1f} nats, less than the "
            f"{extra * math.log(n) / 2:.1f} nats its {extra} extra parameters cost. Versicolor and "
            "virginica overlap, so the data alone barely separate them (tutorial 1).")


# ----- 2. variational EM -----------------------------------------------------------------------
GLMM_TRUTH = {"beta": (-0.5, 1.0), "sigma": 1.0}
RUNNING_WINDOW = 50  # steps a training curve's running mean averages


def glmm_stage(out: Path, budget: Budget, seed: int, progress: bool) -> Section:
    """Variational EM for a random-intercept logistic regression, against the quadrature MLE."""
    groups = budget.glmm_groups
    data = RandomInterceptLogistic.simulate(groups, 10, **GLMM_TRUTH, seed=seed)
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
    top = loglik["quadrature MLE"]
    path = _plot(out / "glmm_elbo.png", "Variational EM: the ELBO during fitting", "SVI step",
                 f"nats (total over {groups} groups)", [],
                 hline=(top, "log-likelihood at the MLE (quadrature)"), ylim=(top - 15, top + 3),
                 bands=[_running(fit.elbo, "ELBO")],
                 marks=[(fit.num_steps, elbo.elbo, f"ELBO at theta_VI ({elbo.num_samples} draws per group)")])
    mle_table, vi_table = tables["quadrature MLE"], tables["variational EM"]
    shift = (vi_table["estimate"] - mle_table["estimate"]) / mle_table["std_err"]
    rows = [(f"{name}: {entry}", f"{t.loc[entry, 'estimate']:.3f} (s.e. {t.loc[entry, 'std_err']:.3f})")
            for name, t in tables.items() for entry in t.index]
    return Section(
        "Variational EM for a GLMM (simulated, known truth)",
        f"Variational EM on {groups} simulated groups: sigma {vi_table.loc['sigma', 'estimate']:.3f} against "
        f"the exact MLE's {mle_table.loc['sigma', 'estimate']:.3f} (s.e. "
        f"{mle_table.loc['sigma', 'std_err']:.3f}); the log-likelihood at theta_VI is "
        f"{top - loglik['variational EM']:.3f} nats below the maximum.",
        [f"{groups} groups of 10 binary responses with a Gaussian random intercept, simulated "
         f"with beta = {GLMM_TRUTH['beta']} and sigma = {GLMM_TRUTH['sigma']}. The posterior of each "
         "intercept has no closed form, so the E-step uses the best Gaussian per group (LocalMeanField) "
         "and freqvi.fit maximises the ELBO over the parameters and the guide together. The likelihood "
         "is a product of one-dimensional integrals, so adaptive Gauss-Hermite quadrature gives the exact "
         "MLE (freqvi.maximize_likelihood) to judge the variational estimate against.",
         "Estimates with their standard errors from the observed information of the exact likelihood "
         "(beta on the logit scale, sigma on the intercepts'); at theta_VI, not a maximum of the "
         "likelihood, that is the likelihood's curvature there rather than a Wald standard error. The "
         "ELBO at the variational fit sits below the log-likelihood there by the KL divergence from the "
         "Gaussian guides to the skewed posteriors. "
         "The variational estimate maximises the ELBO, not the likelihood; the last row measures how far "
         "it lands from the MLE on these data, in the MLE's standard errors (a difference that also holds "
         f"the optimisation error of {fit.num_steps} SVI steps).",
         "Each SVI step's ELBO is a one-draw Monte-Carlo estimate: the figure shows their running mean "
         "with a band of two standard errors, which can reach above the log-likelihood by noise alone."],
        [*rows,
         ("log-likelihood at the MLE", f"{top:.3f} nats, total over {groups} groups (quadrature)"),
         ("log-likelihood at theta_VI", f"{loglik['variational EM']:.3f} nats (quadrature)"),
         ("ELBO at theta_VI",
          reporting.with_errors(elbo.elbo, "nats", [("Monte-Carlo", elbo.standard_error)])),
         ("variational EM minus MLE, in the MLE's s.e.",
          ", ".join(f"{entry} {value:+.2f}" for entry, value in shift.items()))],
        [(path.name, f"The ELBO during variational EM: the running mean of {RUNNING_WINDOW} one-draw "
                     "estimates with two standard errors either side, the ELBO at the end estimated with "
                     "many draws, and the exact log-likelihood at the MLE.")],
        {"truth": GLMM_TRUTH, "num_groups": groups,
         "log_likelihood": {name: {"total": value} for name, value in loglik.items()},
         "elbo": {"total": elbo.elbo, "monte_carlo_standard_error_total": elbo.standard_error},
         "estimates": {name: {entry: {"estimate": t.loc[entry, "estimate"],
                                      "observed_information_standard_error_estimate": t.loc[entry, "std_err"]}
                              for entry in t.index} for name, t in tables.items()},
         "variational_minus_mle_in_mle_se_units": shift.to_dict(), "num_steps": fit.num_steps},
    )


# ----- 3. VAE ----------------------------------------------------------------------------------
VAE_VALIDATION = 200  # training images held back for early stopping


def vae_stage(out: Path, budget: Budget, seed: int, progress: bool) -> Section:
    """A variational autoencoder on the 8x8 digits, judged by its held-out log-likelihood."""
    # binarised, so that the Bernoulli likelihood is a normalised density and log p(x) a log-likelihood
    train, test = (load_digits(split, binarize=True) for split in ("train", "test"))
    train, validation = train[:-VAE_VALIDATION], train[-VAE_VALIDATION:]
    torch.manual_seed(seed)  # the networks' initial weights: without it each run starts elsewhere
    model = VAE(64, latent_dim=8)
    fit = freqvi.fit(model, train, loss="mean_field", lr=2e-3, num_steps=budget.vae_steps,
                     batch_size=128, seed=seed, progress=progress, validation_data=validation,
                     eval_every=max(budget.vae_steps // 10, 1))
    loglik = freqvi.log_likelihood(model, test, num_samples=budget.vae_importance_samples, seed=seed)
    # annealed importance sampling checks the number where k-hat says importance sampling cannot
    annealed = freqvi.log_likelihood(model, test, method="ais", num_temperatures=budget.vae_ais_temperatures,
                                     seed=seed)
    terms = freqvi.elbo_terms(model, test, num_samples=100, seed=seed)
    n, n_train = len(test), len(train)
    estimate = reporting.importance_estimate(loglik, n)
    check = reporting.held_out(annealed.total, annealed.standard_error, annealed.per_observation, n)
    elbo = reporting.held_out(terms.elbo, terms.standard_error, terms.per_observation, n)
    curve = _plot(out / "vae_elbo.png", "VAE training", "step (128 images each)", "ELBO (nats per image)",
                  [(fit.validation_steps, np.asarray(fit.validation_elbo) / len(validation), "validation",
                    "-o")], bands=[_running(np.asarray(fit.elbo) / n_train, "training")])
    pictures = [plots.reconstructions(model, test, out / "vae_reconstructions.png"),
                plots.samples(model, out / "vae_samples.png")]
    return Section(
        "A variational autoencoder (digits)",
        f"VAE on binarised digits: held-out log-likelihood {_per_image(estimate, n)}, by importance "
        f"sampling ({loglik.proposal} proposal); k-hat above 0.7 for "
        f"{estimate['pareto_k_fraction_above_0.7']:.1%} of images; annealed importance sampling, which "
        f"does not rely on the proposal's tails, differs by "
        f"{check['mean_per_observation'] - estimate['mean_per_observation']:+.3f} nats per image.",
        ["A VAE is amortised VI with a neural decoder: z ~ N(0, I), each pixel (binarised at 0.5) Bernoulli "
         "given a decoder network of z, and an encoder network as the guide. The decoder's weights are the "
         "parameters theta, estimated by maximum likelihood through the ELBO (analytic KL); the encoder "
         f"only serves the approximation. Fitted on {n_train} training images (early stopping on "
         f"{len(validation)} more), judged on {n} held-out test images.",
         "The held-out log-likelihood is estimated by importance sampling from a proposal built on the "
         f"encoder: {_proposal_words(loglik.proposal)}. Two standard errors go with it: the Monte-Carlo "
         "one (other draws, the same images) and the sampling one (another test set of the same size). "
         "PSIS k-hat judges each image's estimate: above 0.7 the weights are so heavy-tailed that the "
         "draws have likely missed their largest values, and since importance sampling underestimates "
         "log p(x) on average, those estimates, and so the mean, are likely too low by more than the "
         "standard error says. Annealed importance sampling (Neal 2001; freqvi.log_likelihood(..., "
         "method='ais')) checks it: each chain moves from the encoder's q to the posterior through a path "
         "of tempered densities by Hamiltonian Monte Carlo, so it does not rely on q covering the "
         "posterior's tails. The log-likelihood exceeds the ELBO by the KL from the encoder's q to the "
         "exact posterior."],
        [("held-out log-likelihood", _per_image(estimate, n)),
         ("estimated by", f"importance sampling, proposal {loglik.proposal}, K = {loglik.num_samples} draws "
                          "per image"),
         ("PSIS k-hat", reporting.pareto_k_text(estimate, "image")),
         ("checked by annealed importance sampling",
          f"{_per_image(check, n)}, {annealed.settings.num_temperatures} temperatures, "
          f"{annealed.num_samples} chains per image (acceptance rate {annealed.acceptance_rate:.2f}); "
          "minus importance sampling: "
          f"{check['mean_per_observation'] - estimate['mean_per_observation']:+.3f} nats per image"),
         ("held-out ELBO", f"{_per_image(elbo, n)} = reconstruction {terms.reconstruction / n:.3f} "
          f"- KL {terms.kl / n:.3f}"),
         ("training", f"{fit.num_steps} steps of 128 images, {fit.wall_time:.1f} s, best validation ELBO at "
          f"step {fit.best_step}")],
        [(curve.name, f"The ELBO per image during training (running mean of {RUNNING_WINDOW} one-draw "
                      "estimates, two standard errors either side), and on the validation images."),
         (pictures[0].name, "Held-out images (top) and their reconstructions (bottom)."),
         (pictures[1].name, "Images generated by the fitted model (decoder means).")],
        {"test_log_likelihood": estimate,
         "test_log_likelihood_ais": {**check, "num_temperatures": annealed.settings.num_temperatures,
                                     "acceptance_rate": annealed.acceptance_rate},
         "test_elbo": {**elbo, "reconstruction_per_observation": terms.reconstruction / n,
                       "kl_per_observation": terms.kl / n},
         "num_steps": fit.num_steps, "best_step": fit.best_step, "wall_time": fit.wall_time},
    )


def _per_image(entry: dict, n: int) -> str:
    """A :func:`freqvi.reporting.held_out` entry's mean per image with both its standard errors."""
    return reporting.with_errors(entry["mean_per_observation"], "nats per image", [
        ("Monte-Carlo", entry["monte_carlo_standard_error_per_observation"]),
        (f"over the {n} test images", entry["sampling_standard_error_per_observation"])])


def _proposal_words(proposal: str) -> str:
    """The importance proposal :func:`freqvi.log_likelihood` used, in words."""
    if proposal == "guide":
        return "the encoder's Gaussian itself"
    if proposal.startswith("student-t"):
        return (f"a {proposal} with the encoder's location and scale, heavier-tailed than the encoder's "
                "Gaussian")
    if proposal.startswith("adaptive student-t"):
        return (f"an {proposal}: heavier-tailed than the encoder's Gaussian, and moved from the encoder's "
                "location and scale to each image's posterior mean and covariance, estimated from pilot "
                "draws (freqvi.log_likelihood's default)")
    return proposal


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
    curve = _plot(out / "diffusion_elbo.png", "Diffusion training (time-subsampled ELBO)",
                  f"step ({DIFFUSION.batch_size} points each)", "ELBO (nats per dimension)", [],
                  hline=(-bound.nats_per_dim, "held-out ELBO, every t"),
                  bands=[_running(np.asarray(fit.elbo) / (len(train) * 2), "training", window)])
    pictures = [plots.forward_noising(model, test[:500], out / "diffusion_noising.png", seed=seed),
                plots.samples_vs_data(samples, test[:half], out / "diffusion_samples.png")]
    nll = {"nats_per_dim": bound.nats_per_dim, "sampling_standard_error_nats_per_dim": bound.standard_error,
           "bits_per_dim": bound.bits_per_dim,
           "sampling_standard_error_bits_per_dim": bound.standard_error / math.log(2),
           "num_observations": len(test)}
    bound_text = (reporting.with_errors(bound.nats_per_dim, "nats per dimension",
                                        [(f"over the {len(test)} test points", bound.standard_error)])
                  + f" = {bound.bits_per_dim:.3f} bits per dimension")
    return Section(
        "A diffusion model (two moons)",
        f"Diffusion model on two moons: held-out NLL bound {bound_text}, against the fitted Gaussian's "
        f"{gaussian:.3f}; energy distance of samples to held-out points {distance:.4f}, against a floor of "
        f"{floor:.4f}.",
        ["A denoising diffusion model is a VAE whose latent is the chain x_1, ..., x_T (T = 1000): the "
         "model is the learned reverse chain, with a network predicting the noise, and the guide is the "
         "fixed forward noising, with no parameters. It is fitted by maximising the same ELBO, estimated "
         "without bias by one random time step per observation with the Gaussian KL of that step in "
         "closed form (loss='time_subsampled'), the step drawn from a learned importance law over t that "
         "lowers the estimate's variance, at a cost that does not grow with T. The model evaluated and "
         f"sampled is an exponential moving average of the weights (decay {DIFFUSION.average.decay}, with "
         "warm-up), which smooths away the noise of the last steps. This is freqvi diffusion's recipe "
         "(freqvi.infer.recipes.DIFFUSION).",
         "On held-out points the full ELBO, every one of the T terms evaluated, bounds the negative "
         "log-likelihood per dimension (of a density on the standardised plane, so it can be negative); "
         "its standard error is over the test points (it includes the Monte-Carlo noise of each point's "
         "bound). A Gaussian fitted to the training points is the baseline. The energy distance of model "
         "samples to held-out points, in the standardised coordinates, is set against its noise floor: "
         "the distance between two halves of the held-out points."],
        [("held-out NLL bound", bound_text),
         ("fitted Gaussian's exact NLL", f"{gaussian:.3f} nats per dimension"),
         ("energy distance, samples to held-out", f"{distance:.4f} ({half} points each)"),
         ("energy distance, held-out half to half", f"{floor:.4f} (the noise floor)"),
         ("training", f"{fit.num_steps} steps of {DIFFUSION.batch_size} points, {fit.wall_time:.1f} s")],
        [(curve.name, f"The time-subsampled ELBO per dimension during training (running mean of {window} "
                      "one-draw estimates of the raw weights, two standard errors either side) and the full "
                      "held-out ELBO of the averaged (EMA) weights."),
         (pictures[0].name, "The forward chain q(x_t | x_0) on held-out points at several t."),
         (pictures[1].name, "Held-out points and samples from the fitted model (ancestral sampling).")],
        {"test_nll_bound": nll, "gaussian_nll_nats_per_dim": gaussian,
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
    metrics = {**header, "sections": {s.title: s.metrics for s in sections},
               "conventions": reporting.conventions()}
    (out / "metrics.json").write_text(reporting.to_json(metrics))
    (out / "report.md").write_text(render_markdown(sections, header))
    report = out / "report.html"
    report.write_text(render_html(sections, header))
    return report


INTRO = ("EM, variational EM, a variational autoencoder and a diffusion model, fitted as one method: "
         "each is a Pyro model/guide pair whose parameters theta are estimated by maximising the ELBO, "
         "with the guide as the E-step.")
UNITS_NOTE = ("Log-likelihoods and ELBOs are in nats (natural-log units): totals over a data set, or per "
              "observation, image or dimension as each says. A standard error says what it measures: "
              "Monte-Carlo (other random draws, the same data), over the test points (another test set of "
              "the same size), or from the observed information (a parameter's, over repeated samples).")


def _subtitle(header: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    return (f"{header['mode']} tour, seed {header['seed']}, {header['seconds']:.0f} s on this machine "
            f"({header['threads']} torch thread(s); {versions}).")


def render_markdown(sections: list[Section], header: dict) -> str:
    """The report as Markdown: a summary, then a heading, prose, a two-column table and the figures per
    section."""
    lines = ["# The freqvi tour", "", INTRO, "", _subtitle(header), "", "## Summary", "",
             *(f"{number}. {s.summary}" for number, s in enumerate(sections, 1)), "", UNITS_NOTE, ""]
    for number, s in enumerate(sections, 1):
        lines += [f"## {number}. {s.title}", "", *(p + "\n" for p in s.paragraphs), "| quantity | value |",
                  "| --- | --- |", *(f"| {q} | {v} |" for q, v in s.rows), ""]
        lines += [f"![{caption}]({name})\n\n*{caption}*\n" for name, caption in s.figures]
    return "\n".join(lines)


def render_html(sections: list[Section], header: dict) -> str:
    """The same report as a self-contained HTML page that loads the PNGs beside it."""
    e = html.escape
    body = [f"<h1>The freqvi tour</h1><p>{e(INTRO)}</p><p><small>{e(_subtitle(header))}</small></p>",
            "<h2>Summary</h2><ol>" + "".join(f"<li>{e(s.summary)}</li>" for s in sections)
            + f"</ol><p>{e(UNITS_NOTE)}</p>"]
    for number, s in enumerate(sections, 1):
        body.append(f"<h2>{number}. {e(s.title)}</h2>" + "".join(f"<p>{e(p)}</p>" for p in s.paragraphs))
        body.append('<table><thead><tr><th scope="col">quantity</th><th scope="col">value</th></tr></thead>'
                    "<tbody>" + "".join(f'<tr><th scope="row">{e(q)}</th><td>{e(v)}</td></tr>'
                                        for q, v in s.rows) + "</tbody></table>")
        body += [f'<figure><img src="{e(name)}" alt="{e(caption)}">'
                 f"<figcaption>{e(caption)}</figcaption></figure>" for name, caption in s.figures]
    style = ("body{font-family:sans-serif;max-width:58em;margin:2em auto;line-height:1.45;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;"
             "text-align:left;vertical-align:top}th{font-weight:normal}thead th{background:#e8e8e8;"
             "font-weight:bold}tbody th{background:#f6f6f6}img{max-width:100%}"
             "figcaption{font-size:.9em;color:#555}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>freqvi tour</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _running(values, label: str, window: int = RUNNING_WINDOW):
    """The running mean of ``values`` over ``window`` steps and its standard error (the window's s.d. over
    the square root of ``window``), as a band ``(steps, mean, s.e., label)`` for :func:`_plot`."""
    values = np.asarray(values, dtype=float)
    window = min(window, len(values))
    kernel = np.ones(window) / window
    mean = np.convolve(values, kernel, mode="valid")
    spread = np.convolve(values ** 2, kernel, mode="valid") - mean ** 2  # the window's variance, divisor w
    se = np.sqrt(np.clip(spread, 0, None) / max(window - 1, 1))  # sqrt(s^2 / w), s^2 with divisor w - 1
    return np.arange(window, len(values) + 1), mean, se, f"{label} (mean of {window} steps)"


def _plot(path: Path, title: str, xlabel: str, ylabel: str, lines, *, hline=None, ylim=None, bands=(),
          marks=(), integer_x: bool = False) -> Path:
    """A line plot of ``lines`` ``[(x, y, label, style)]``.

    ``bands``: ``[(x, mean, s.e., label)]`` drawn as a line with a shaded band of two standard errors;
    ``hline``: a labelled horizontal line ``(y, label)``; ``marks``: labelled points ``(x, y, label)``;
    ``integer_x``: ticks at integers only (a count on the x axis).
    """
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    for x, mean, se, label in bands:
        line, = ax.plot(x, mean, "-", lw=1.2, label=label)
        ax.fill_between(x, mean - 2 * se, mean + 2 * se, color=line.get_color(), alpha=0.25, lw=0,
                        label="two standard errors")
    for x, y, label, style in lines:
        ax.plot(list(x), list(y), style, label=label, markersize=3, lw=1.2)
    if hline is not None:
        ax.axhline(hline[0], color="k", ls=":", label=hline[1])
    for (x, y, label), marker in zip(marks, "sD^", strict=False):
        ax.plot([x], [y], marker, ms=7, mfc="none", mew=1.5, label=label)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **({"ylim": ylim} if ylim else {}))
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path

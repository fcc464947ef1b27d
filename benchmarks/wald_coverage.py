"""Coverage of freqvi's 95% Wald intervals over data sets simulated from known parameters.

For each case and each of R replications, data are drawn from the true
parameters, the model is fitted, and ``freqvi.observed_information`` gives a
standard error per entry on the statistical scale freqvi reports; the entry is
covered when ``|estimate - truth| <= 1.96 se``. Cases:

* ``mixture``: ``GaussianMixture(2, 1, "spherical", reg_covar=0)``, n = 500, truth
  weights (0.35, 0.65), locs (-2, 2), variances (0.49, 1.0): 4.7 pooled standard
  deviations apart, so labels do not switch under resampling. Fitted by
  ``freqvi.em`` from its *default* (k-means++) start, as a user would fit it, with
  ``tol=1e-12``; the components are then sorted by their means to align labels with
  the truth (the likelihood is invariant to the relabelling).
* ``ppca``: ``FactorAnalysis(4, 1, "isotropic")``, n = 300, fitted by ``freqvi.em``
  (default start, ``tol=1e-12``); the loading's sign (flipping it leaves the
  likelihood unchanged) is aligned with the truth.
* ``glmm-mle`` and ``glmm-vi``: ``RandomInterceptLogistic(2)``, 100 groups of 10,
  beta = (-0.5, 1.0), sigma = 1.0. ``mle``: the adaptive Gauss-Hermite
  log-likelihood maximised directly by ``freqvi.maximize_likelihood`` (L-BFGS);
  ``vi``: joint SVI with the per-group Gaussian guide (600 steps of decaying Adam, as
  in the tests). Both take standard errors from the exact (quadrature) Hessian at
  their own estimate.

Each replication is seeded from ``numpy.random.SeedSequence(seed).spawn``, so the
results do not depend on the number of workers. Run
``python benchmarks/wald_coverage.py`` (R = 500), ``--quick`` for R = 20.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time
import warnings
from collections import Counter

import numpy as np
import pyro
import torch

import freqvi
from freqvi.models import FactorAnalysis, GaussianMixture, RandomInterceptLogistic

Z95 = 1.959963984540054
MIXTURE = {"weights": [0.35, 0.65], "locs": [[-2.0], [2.0]], "covariances": [0.49, 1.0]}
PPCA = {"mean": [1.0, -0.5, 0.0, 2.0], "loading": [[1.5], [-1.0], [0.5], [2.0]], "noise_variance": 0.36}
GLMM = {"beta": [-0.5, 1.0], "sigma": 1.0}
CASES = {"mixture": MIXTURE, "ppca": PPCA, "glmm": GLMM}
VI_STEPS = 600
GLMM_NOTE = """
glmm-vi against glmm-mle: both take standard errors from the exact (quadrature) observed information, so
their intervals have the same, correct width; they differ in where they are centred. theta_VI maximises
the ELBO, not the likelihood: the KL gap between the Gaussian guide and the skewed posterior of each u_i
depends on theta, so theta_VI - theta_MLE is a bias of order 1 per group that does NOT shrink as groups
are added, while the standard errors shrink like m^(-1/2). Compare the bias and se columns: coverage of
the VI intervals is near nominal only while the bias is small against the se, and it falls toward 0 as m
grows (the MLE's does not). The quadrature MLE is the reference; the VI intervals are not valid
confidence intervals for theta, only for the ELBO maximiser's population value."""


# ----- simulation ------------------------------------------------------------------------------
def simulate(case: str, rng: np.random.Generator):
    if case == "mixture":
        z = rng.random(500) < MIXTURE["weights"][1]
        sd = np.sqrt(MIXTURE["covariances"])
        locs = np.array(MIXTURE["locs"])[:, 0]
        return (torch.as_tensor(np.where(z, rng.normal(locs[1], sd[1], 500), rng.normal(locs[0], sd[0], 500))
                                [:, None]),)
    if case == "ppca":
        w, mean = np.array(PPCA["loading"]), np.array(PPCA["mean"])
        noise = math.sqrt(PPCA["noise_variance"]) * rng.normal(size=(300, 4))
        x = mean + rng.normal(size=(300, 1)) @ w.T + noise
        return (torch.as_tensor(x),)
    m, n = 100, 10
    groups = np.repeat(np.arange(m), n)
    X = np.column_stack([np.ones(m * n), rng.normal(size=m * n)])
    u = GLMM["sigma"] * rng.normal(size=m)
    y = (rng.random(m * n) < 1 / (1 + np.exp(-(X @ GLMM["beta"] + u[groups])))).astype(float)
    return RandomInterceptLogistic.pad(torch.as_tensor(X), torch.as_tensor(y), groups)


# ----- fits: each returns {variant: (estimates, standard errors)} ---------------------------------
def estimates_and_errors(model, data):
    info = freqvi.observed_information(model, data, method="exact")
    return model.estimates(), info.standard_errors()


def fit_mixture(data, seed):
    model = GaussianMixture(2, 1, "spherical", reg_covar=0.0)
    freqvi.em(model, data, tol=1e-12, max_iter=20000, seed=seed, progress=False)
    est, se = estimates_and_errors(model, data)
    order = torch.argsort(est["locs"][:, 0])  # align labels with the truth (locs sorted ascending)
    return {"": ({k: v[order] for k, v in est.items()}, {k: v[order] for k, v in se.items()})}


def fit_ppca(data, seed):
    model = FactorAnalysis(4, 1, "isotropic")
    freqvi.em(model, data, tol=1e-12, max_iter=50000, seed=seed, progress=False)
    est, se = estimates_and_errors(model, data)
    if float((est["loading"] * torch.tensor(PPCA["loading"])).sum()) < 0:  # align the loading's sign
        est["loading"] = -est["loading"]
    return {"": (est, se)}


def quadrature_mle(data):
    """The AGHQ log-likelihood maximised directly (``freqvi.maximize_likelihood``), from (0, 0, 1)."""
    model = RandomInterceptLogistic(2, init={"beta": [0.0, 0.0], "sigma": 1.0})
    freqvi.maximize_likelihood(model, data, tol=1e-9)
    return model


def fit_glmm(data, seed):
    out = {"-mle": estimates_and_errors(quadrature_mle(data), data)}
    pyro.clear_param_store()
    model = RandomInterceptLogistic(2)
    decay = (1e-3 / 0.05) ** (1 / VI_STEPS)  # Adam, lr 0.05 decayed to 1e-3; no clipping (see the tests)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": decay, "clip_norm": math.inf})
    freqvi.fit(model, data, loss="mean_field", optim=optim, num_steps=VI_STEPS, seed=seed,
               progress=False)
    out["-vi"] = estimates_and_errors(model, data)
    return out


FITS = {"mixture": fit_mixture, "ppca": fit_ppca, "glmm": fit_glmm}


def replicate(task):
    """One replication: simulate, fit, and record per entry whether its interval covers the truth."""
    case, seed = task
    pyro.clear_param_store()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = simulate(case, np.random.default_rng(seed))
        fits = FITS[case](data, int(seed.generate_state(1)[0]))
    covered = {}
    for variant, (est, se) in fits.items():
        for name, truth in CASES[case].items():
            truth = torch.as_tensor(truth, dtype=torch.float64)
            for index in np.ndindex(*truth.shape):
                entry = name + (str(list(index)) if index else "")
                error = abs(float(est[name][index]) - float(truth[index]))
                covered[(case + variant, entry)] = (error <= Z95 * float(se[name][index]),
                                                    float(est[name][index]) - float(truth[index]),
                                                    float(se[name][index]))
    names = Counter(f"{w.category.__name__}: {str(w.message)[:90]}" for w in caught)
    return covered, time.perf_counter() - start, names


def init_worker():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


# ----- report ----------------------------------------------------------------------------------
def report(case: str, results, seconds: float) -> None:
    rows: dict[tuple[str, str], list] = {}
    for covered, _, _ in results:
        for key, value in covered.items():
            rows.setdefault(key, []).append(value)
    r = len(results)
    for (variant, entry), values in rows.items():
        hits, errors, ses = (np.array(column) for column in zip(*values, strict=True))
        p = hits.mean()
        mcse = math.sqrt(p * (1 - p) / r)
        ok = abs(p - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / r)
        print(f"{variant:<11} {entry:<18} {r:>4} {p:>9.3f} {mcse:>7.3f} {'yes' if ok else 'NO':>9} "
              f"{errors.mean():>+10.4f} {errors.std() / math.sqrt(r):>8.4f} {ses.mean():>7.4f}", flush=True)
    fit_times = np.array([t for _, t, _ in results])
    print(f"{'':<11} time: {seconds:.0f} s wall, {fit_times.mean():.2f} s per replication "
          f"(max {fit_times.max():.2f})", flush=True)
    warned = sum((c for _, _, c in results), Counter())
    for message, count in warned.most_common():
        print(f"{'':<11} warning x{count}: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=500, help="R, per case")
    parser.add_argument("--glmm-replications", type=int, help="R for the GLMM only (default: R)")
    parser.add_argument("--quick", action="store_true", help="R = 20")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    default = 20 if args.quick else args.replications
    replications = {case: default for case in CASES}
    if args.glmm_replications and not args.quick:
        replications["glmm"] = args.glmm_replications

    print(f"torch {torch.__version__}, pyro {pyro.__version__}, freqvi {freqvi.__version__}; "
          f"{args.workers} worker processes, 1 torch thread each; seed {args.seed}")
    print(f"R per case: {replications}; nominal 0.95, 3 MC SEs at R: "
          + ", ".join(f"{3 * math.sqrt(0.95 * 0.05 / r):.3f}" for r in replications.values()))
    print("coverage: share of replications whose 95% Wald interval covers the truth; "
          "bias: mean(est - truth); se: mean standard error")
    print(f"\n{'case':<11} {'entry':<18} {'R':>4} {'coverage':>9} {'MC_se':>7} {'within3se':>9} "
          f"{'bias':>10} {'bias_se':>8} {'se':>7}", flush=True)
    total = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, initializer=init_worker) as pool:
        for i, case in enumerate(args.cases):
            seeds = np.random.SeedSequence([args.seed, i]).spawn(replications[case])
            start = time.perf_counter()
            results = list(pool.imap(replicate, [(case, s) for s in seeds]))
            report(case, results, time.perf_counter() - start)
    print(f"\ntotal wall time {time.perf_counter() - total:.0f} s")
    if "glmm" in args.cases:
        print(GLMM_NOTE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

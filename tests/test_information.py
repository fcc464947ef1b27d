"""Observed information, standard errors and model choice against finite differences and scikit-learn."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import freqvi
from freqvi.infer.information import BoundaryWarning, IdentifiabilityWarning, NotAMaximumWarning
from freqvi.models import FactorAnalysis, GaussianMixture


def finite_difference_hessian(f, theta: np.ndarray, step: float = 1e-4) -> np.ndarray:
    """Central second differences of a scalar float64 function, steps relative to |theta|."""
    h = step * np.maximum(np.abs(theta), 1.0)
    p = len(theta)
    out = np.empty((p, p))
    for a in range(p):
        for b in range(a, p):
            def at(sa, sb, a=a, b=b):
                t = theta.copy()
                t[a] += sa * h[a]
                t[b] += sb * h[b]
                return f(t)
            out[a, b] = out[b, a] = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / (4 * h[a] * h[b])
    return out


def mixture_1d(n, seed, low=-1.0):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.35
    return np.where(z, rng.normal(low, 0.7, n), rng.normal(1.5, 1.0, n))[:, None]


def fit_mixture_1d(x):
    gm = GaussianMixture(2, 1, "spherical", reg_covar=0.0)
    freqvi.em(gm, torch.as_tensor(x), tol=1e-13, max_iter=20000, progress=False)
    return gm


def mixture_1d_loglik(t, x):
    """theta = (w_0, mu_0, mu_1, var_0, var_1): the statistical scale, a free parametrisation."""
    w = np.array([t[0], 1 - t[0]])
    comps = [np.log(w[k]) + norm.logpdf(x[:, 0], t[1 + k], math.sqrt(t[3 + k])) for k in range(2)]
    return float(np.logaddexp(*comps).sum())


def test_mixture_standard_errors_match_a_finite_difference_hessian():
    x = mixture_1d(400, seed=1)
    gm = fit_mixture_1d(x)
    est = gm.estimates()
    theta = np.concatenate([est["weights"][:1], est["locs"][:, 0], est["covariances"]]).astype(float)
    reference = np.sqrt(np.diag(np.linalg.inv(-finite_difference_hessian(
        lambda t: mixture_1d_loglik(t, x), theta))))
    se = freqvi.observed_information(gm, torch.as_tensor(x)).standard_errors()
    ours = np.concatenate([se["weights"][:1], se["locs"][:, 0], se["covariances"]])
    np.testing.assert_allclose(ours, reference, rtol=1e-3)
    assert float(se["weights"][0]) == pytest.approx(float(se["weights"][1]), rel=1e-10)  # w_1 = 1 - w_0


def test_ppca_standard_errors_match_a_finite_difference_hessian():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 1)) @ np.array([[1.5, -1.0, 0.5, 2.0]]) + 0.6 * rng.normal(size=(300, 4))
    fa = FactorAnalysis(4, 1, "isotropic")
    freqvi.em(fa, torch.as_tensor(x), tol=1e-13, max_iter=50000, progress=False)
    est = fa.estimates()
    theta = np.concatenate([est["mean"], est["loading"][:, 0], est["noise_variance"][None]]).astype(float)

    def loglik(t):
        w = t[4:8, None]
        return float(multivariate_normal(t[:4], w @ w.T + t[8] * np.eye(4)).logpdf(x).sum())

    reference = np.sqrt(np.diag(np.linalg.inv(-finite_difference_hessian(loglik, theta))))
    se = freqvi.observed_information(fa, torch.as_tensor(x)).standard_errors()
    ours = np.concatenate([se["mean"], se["loading"][:, 0], se["noise_variance"][None]])
    np.testing.assert_allclose(ours, reference, rtol=1e-3)


def test_louis_identity_with_the_exact_posterior_matches_the_exact_hessian():
    # Components that overlap a little, so the missing-information term matters.
    x = torch.as_tensor(mixture_1d(300, seed=3, low=-2.0))
    gm = fit_mixture_1d(x.numpy())
    exact = freqvi.observed_information(gm, x)
    louis = freqvi.observed_information(gm, x, method="louis", num_samples=1000, seed=0)
    assert louis.method == "louis" and exact.method == "exact"
    se_exact, se_louis = exact.standard_errors(), louis.standard_errors()
    for name in se_exact:
        np.testing.assert_allclose(se_louis[name], se_exact[name], rtol=0.05)


@pytest.mark.slow
def test_sandwich_equals_observed_information_when_the_model_is_right():
    x = torch.as_tensor(mixture_1d(5000, seed=4))
    gm = fit_mixture_1d(x.numpy())
    info = freqvi.observed_information(gm, x)
    observed, sandwich = info.standard_errors(), info.standard_errors("sandwich")
    for name in observed:  # the meat's relative sampling error is O(n^-1/2) ~ 1.4%, times kurtosis
        np.testing.assert_allclose(sandwich[name], observed[name], rtol=0.1)


@pytest.mark.slow
def test_rotated_factor_loadings_have_no_standard_error_and_say_so():
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.normal(size=(300, 2)) @ rng.normal(size=(2, 5)) + 0.3 * rng.normal(size=(300, 5)))
    fa = FactorAnalysis(5, 2)
    freqvi.em(fa, x, tol=1e-12, max_iter=20000, progress=False)
    info = freqvi.observed_information(fa, x)
    with pytest.warns(IdentifiabilityWarning, match=r"\['loading'\] are not identified"):
        se = info.standard_errors()
    assert torch.isnan(se["loading"]).all()
    assert torch.isfinite(se["mean"]).all() and torch.isfinite(se["noise_variance"]).all()
    assert info.num_parameters == 5 + 5 * 2 + 5 - 1  # d + dq + d - q(q-1)/2


def test_summary_table_is_a_wald_table():
    x = mixture_1d(400, seed=1)
    gm = fit_mixture_1d(x)
    table = freqvi.observed_information(gm, torch.as_tensor(x)).summary(level=0.9)
    row = table.loc["locs[1, 0]"]
    assert row["z"] == pytest.approx(row["estimate"] / row["std_err"])
    assert row["p_value"] == pytest.approx(2 * norm.sf(abs(row["z"])))
    assert row["[0.05"] == pytest.approx(row["estimate"] - norm.ppf(0.95) * row["std_err"])
    assert len(table) == 2 + 2 + 2


def test_bic_agrees_with_scikit_learn_on_the_same_parameters():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal([0, 0], 1.0, (150, 2)), rng.normal([4, 1], 0.7, (100, 2))])
    sk = SkGaussianMixture(2, tol=1e-12, max_iter=5000, reg_covar=0.0, random_state=0).fit(x)
    gm = GaussianMixture(2, 2, reg_covar=0.0, init={"weights": sk.weights_, "locs": sk.means_,
                                                    "covariances": sk.covariances_})
    criteria = freqvi.information_criteria(gm, torch.as_tensor(x))
    assert criteria.num_parameters == 1 + 4 + 6
    assert criteria.bic == pytest.approx(sk.bic(x), rel=1e-6)
    assert criteria.aic == pytest.approx(sk.aic(x), rel=1e-6)


@pytest.mark.slow
def test_bic_picks_the_true_number_of_components():
    hits = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
        x = torch.as_tensor(np.concatenate([rng.normal(c, 1.0, (100, 2)) for c in centres]))
        table = freqvi.compare({k: GaussianMixture(k, 2) for k in range(1, 6)}, x, seed=seed)
        hits += table.index[0] == 3
    assert hits >= 9


def test_a_parameter_on_its_boundary_is_flagged():
    x = torch.as_tensor(mixture_1d(100, seed=7))
    gm = GaussianMixture(2, 1, "spherical", init={"weights": [1 - 1e-8, 1e-8], "locs": [[0.0], [9.0]],
                                                   "covariances": [1.0, 1.0]})
    with pytest.warns(BoundaryWarning, match=r"weights \(an entry within 1e-06 of 0\)"):
        freqvi.observed_information(gm, x)


@pytest.mark.parametrize(("covariance", "score"), [("full", -10.0), ("diag", -5.0), ("spherical", -5.0)])
def test_a_variance_on_its_floor_is_a_boundary_and_not_a_maximum(covariance, score):
    """Issue 15 item 4: 30 N(0, 1) draws and ten copies of 4.0, K = 2, default reg_covar.

    The second component sits on the ten copies with variance v = reg_covar. There
    sum_i log N(4; 4, v) = -5 log v + const, so the score along log v is -10/2 = -5,
    and along log L = (log v)/2 (a Cholesky factor's unconstrained diagonal) it is -10.
    """
    rng = np.random.default_rng(0)
    x = torch.as_tensor(np.concatenate([rng.normal(size=30), np.full(10, 4.0)])[:, None])
    gm = GaussianMixture(2, 1, covariance)
    floored = r"em ended on the floor .*\['covariances\[1\] .*columns \[0\]\)'\]"  # the ten copies only
    with pytest.warns(BoundaryWarning, match=floored):
        freqvi.em(gm, data=x, tol=1e-10, max_iter=2000, progress=False, seed=0)
    assert gm.estimates()["covariances"].min() == pytest.approx(1e-6, rel=1e-9)
    with pytest.warns(BoundaryWarning, match=r"an eigenvalue on the reg_covar floor 1e-06"):
        info = freqvi.observed_information(gm, x)
    assert info.scores.sum(0).min() == pytest.approx(score, rel=1e-6)
    with pytest.warns(NotAMaximumWarning, match="not a maximum"), \
            pytest.warns(IdentifiabilityWarning, match="on a boundary, see the BoundaryWarning"):
        info.summary()


def test_an_interior_maximum_is_stationary():
    """At a converged interior fit the score statistic is 0 to the fit's precision: no warning."""
    x = mixture_1d(400, seed=1)
    info = freqvi.observed_information(fit_mixture_1d(x), torch.as_tensor(x))
    assert info.score_statistic() < 1e-8
    info.summary()


def test_summary_lists_each_covariance_entry_once():
    """A covariance is symmetric: [k, i, j] and [k, j, i] are one parameter, listed once (lower triangle)."""
    x = freqvi.datasets.load_iris().double()
    gm = GaussianMixture(2, 4)
    freqvi.em(gm, x, seed=0, progress=False)
    table = freqvi.observed_information(gm, x).summary()
    assert len(table) == 2 + 2 * 4 + 2 * 4 * 5 // 2
    assert "covariances[0, 1, 0]" in table.index and "covariances[0, 0, 1]" not in table.index
    full = freqvi.observed_information(gm, x).standard_errors()["covariances"]
    assert table.loc["covariances[1, 3, 2]", "std_err"] == pytest.approx(float(full[1, 2, 3]))

"""Float32 mixtures give the float64 answer to float32 accuracy, and reg_covar floors every eigenvalue.

Issue 15 item 1: second moments formed without centring cancel in float32. Right values
come from closed forms (a component on one point has covariance reg_covar I), from the
float64 fit of the same float32 values from the same start, and from scikit-learn.
"""

import contextlib
import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import freqvi
from freqvi.infer.information import BoundaryWarning
from freqvi.models import GaussianMixture

DTYPES = [torch.float32, torch.float64]


def fit(x: np.ndarray, k: int, covariance: str, dtype, init=None, reg_covar=1e-6, floored: str | None = None,
        **options):
    """em from seed 0; ``floored``: the end on the reg_covar floor that em must warn of (a regex)."""
    gm = GaussianMixture(k, x.shape[1], covariance, init=init, reg_covar=reg_covar)
    data = torch.as_tensor(x, dtype=dtype)
    # tol 1e-6 nats per row: above float32's rounding of the objective, far below the 0.01 compared.
    with on_the_floor(floored):
        freqvi.em(gm, data=data, progress=False, seed=0, **{"tol": 1e-6, "max_iter": 2000, **options})
    return gm, float(gm.log_marginal(data).detach().double().sum())


def on_the_floor(floored: str | None):
    """Expects em's BoundaryWarning matching ``floored``; ``None``: no warning (the suite errs on one)."""
    return contextlib.nullcontext() if floored is None else pytest.warns(BoundaryWarning, match=floored)


def eigenvalues(gm: GaussianMixture) -> np.ndarray:
    cov = gm.estimates()["covariances"].double().numpy()
    return np.linalg.eigvalsh(cov).ravel() if gm.covariance == "full" else cov.ravel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_far_points_spherical(dtype):
    """Each component on one point: variances are reg_covar, l = 2 (log 1/2 - 1/2 log(2 pi 0.1))."""
    gm, loglik = fit(np.array([[9999.0], [0.0]]), 2, "spherical", dtype, reg_covar=0.1,
                     floored=r"covariances\[0\] .*floor 0.1, along columns \[0\]\).*covariances\[1\]")
    np.testing.assert_allclose(gm.estimates()["covariances"], [0.1, 0.1], rtol=1e-6)
    assert loglik == pytest.approx(2 * (math.log(0.5) - 0.5 * math.log(2 * math.pi * 0.1)), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_repeated_points_full(dtype):
    """Ten copies each of (0, 0) and (5, 5): covariances 1e-6 I, l = 20 (log 1/2 - log(2 pi 1e-6))."""
    x = np.repeat([[0.0, 0.0], [5.0, 5.0]], 10, axis=0)
    gm, loglik = fit(x, 2, "full", dtype, floored=r"covariances\[0\] .*covariances\[1\] .*columns \[0, 1\]")
    np.testing.assert_allclose(gm.estimates()["covariances"], np.broadcast_to(1e-6 * np.eye(2), (2, 2, 2)),
                               rtol=1e-5, atol=1e-12)
    assert loglik == pytest.approx(20 * (math.log(0.5) - math.log(2 * math.pi * 1e-6)), rel=1e-6)


def test_tight_far_cluster_float32_fits_like_float64_and_scikit_learn():
    """50 N(0, I) draws and 50 points at (1000, 1000) with 1e-3 noise, K = 2, full covariances.

    The float32 fit can only be as close as its means can be: a float32 number near 1000
    is within half a spacing, h = 3.05e-5, of any real, and moving the far component's
    mean by h costs up to 50/2 |h|^T |Sigma^{-1}| |h| nats (about 0.03 here), which
    bounds the difference from the float64 fit.
    """
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(50, 2)), 1000 + 1e-3 * rng.normal(size=(50, 2))])
    x = x.astype(np.float32).astype(np.float64)  # both precisions see the same values
    gm64, loglik64 = fit(x, 2, "full", torch.float64)
    gm32, loglik32 = fit(x, 2, "full", torch.float32)
    sk = SkGaussianMixture(2, covariance_type="full", reg_covar=1e-6, tol=1e-12, random_state=0).fit(x)
    assert loglik64 == pytest.approx(sk.score(x) * len(x), abs=1e-6)
    far = int(gm64.estimates()["locs"][:, 0].argmax())
    h = np.full(2, np.spacing(np.float32(1000.0)) / 2)
    precision = np.abs(np.linalg.inv(gm64.estimates()["covariances"][far].numpy()))
    bound = 25 * h @ precision @ h
    assert abs(loglik32 - loglik64) <= bound
    assert eigenvalues(gm32).min() >= 1e-6 * (1 - 1e-3)


# (offset, spread) of the data: offsets up to 1e4, spreads down to 1e-3 (and 0: repeated
# points). A float32 fit can be no closer than its means can be: within half a spacing h of
# the float64 ones, costing up to n_k/2 h^T Sigma^{-1} h nats. Here that is below 1e-3 nats
# (e.g. offset 1e2, spread 1e-3: 30 * 2 * (3.8e-6)^2 / 1.16e-6), so 0.01 nats tests the
# algorithm. At 1e4 with spread 0.1 it is already 0.01 nats, and with spread 1e-3 about 7:
# float32's spacing there, 9.8e-4, is the spread itself, whatever the algorithm.
SCALES = [(0.0, 1.0), (1e4, 1.0), (1e3, 0.1), (1e2, 1e-3), (1.0, 1e-3), (1e3, 0.0)]


def offset_data(offset: float, spread: float, seed: int = 0) -> np.ndarray:
    """Two clusters of 60 rows near ``offset (1, 1)``, ``spread`` apart in scale, in float32 values.

    The first is anisotropic and correlated (spread ``spread``), the second 40 spreads
    away with spread ``3 spread``. With ``spread = 0`` the second cluster is one point
    repeated, whose covariance must sit exactly on the reg_covar floor.
    """
    rng = np.random.default_rng(seed)
    first = offset + spread * rng.normal(size=(60, 2)) @ np.array([[1.0, 0.6], [0.0, 0.4]])
    second = offset + 40 * max(spread, 1e-2) + 3 * spread * rng.normal(size=(60, 2))
    return np.concatenate([first, second]).astype(np.float32).astype(np.float64)


def start(x: np.ndarray, covariance: str, spread: float) -> dict:
    """A shared start near, but not at, the clusters' means (float64 values)."""
    locs = np.stack([x[:60].mean(0), x[60:].mean(0)]) + 0.5 * max(spread, 1e-3)
    var = 2 * max(spread, 1e-3) ** 2
    cov = {"full": np.stack([var * np.eye(2)] * 2), "diag": np.full((2, 2), var),
           "spherical": np.full(2, var)}[covariance]
    return {"weights": [0.5, 0.5], "locs": locs, "covariances": cov}


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
@pytest.mark.parametrize(("offset", "spread"), SCALES)
def test_float32_fit_matches_float64_from_the_same_start(covariance, offset, spread):
    x = offset_data(offset, spread)
    init = start(x, covariance, spread)
    # spread 0: each cluster is one point repeated, so each component sits on the floor
    both = r"\['covariances\[0\] \(an eigenvalue on the reg_covar floor.*'covariances\[1\]"
    floored = both if spread == 0 else None
    gm64, loglik64 = fit(x, 2, covariance, torch.float64, init=init, floored=floored)
    gm32, loglik32 = fit(x, 2, covariance, torch.float32, init=init, floored=floored)
    assert abs(loglik32 - loglik64) <= max(1e-5 * abs(loglik64), 0.01), (loglik32, loglik64)
    for gm in (gm32, gm64):
        assert eigenvalues(gm).min() >= 1e-6 * (1 - 1e-3)


class FixedBatches:
    """Minibatches of 20 rows in one fixed order, so that both precisions see the same ones."""

    def __init__(self, x: torch.Tensor):
        order = torch.as_tensor(np.random.default_rng(0).permutation(len(x)))
        self.parts = list(torch.split(x[order], 20))

    def __iter__(self):
        return iter(self.parts)


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")  # ten passes, tol 0
@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
@pytest.mark.parametrize(("offset", "spread"), [(1e4, 1.0), (1e2, 1e-3), (1e3, 0.0)])
def test_online_em_float32_follows_float64(covariance, offset, spread):
    """Online EM (ten passes over minibatches of 20, step size t^-0.6) from the same start."""
    x = offset_data(offset, spread)
    init = start(x, covariance, spread)
    loglik = {}
    for dtype in DTYPES:
        gm = GaussianMixture(2, 2, covariance, init=init)
        data = torch.as_tensor(x, dtype=dtype)
        with on_the_floor(r"covariances\[0\] .*covariances\[1\]" if spread == 0 else None):  # one point each
            freqvi.em(gm, data=FixedBatches(data), num_observations=len(x), max_iter=10, tol=0.0,
                      progress=False)
        loglik[dtype] = float(gm.log_marginal(data).detach().double().sum())
        assert eigenvalues(gm).min() >= 1e-6 * (1 - 1e-3)
    assert abs(loglik[torch.float32] - loglik[torch.float64]) <= max(1e-5 * abs(loglik[torch.float64]), 0.01)


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
def test_blended_statistics_are_the_statistics_of_the_union(covariance):
    """Blending two halves' statistics with gamma = 1/2 gives the whole data's, as raw moments would."""
    x = torch.as_tensor(offset_data(1e2, 0.5))
    gm = GaussianMixture(2, 2, covariance, init=start(x.numpy(), covariance, 0.5))
    gm.model(x)
    resp = torch.softmax(torch.as_tensor(np.random.default_rng(1).normal(size=(120, 2))), -1)
    shift = gm.locs.detach()
    first, second = gm._statistics(resp[::2], x[::2], shift), gm._statistics(resp[1::2], x[1::2], shift)
    blended = gm.blend_statistics(first, second, 0.5)
    # Independent reference: weighted moments of all rows in numpy.
    r, xs = resp.numpy(), x.numpy()
    for k in range(2):
        mean = r[:, k] @ xs / r[:, k].sum()
        outer = np.einsum("i,ij,ik->jk", r[:, k], xs - mean, xs - mean) / len(xs)
        scatter = outer if covariance == "full" else np.diag(outer)
        np.testing.assert_allclose(blended["n"][k], r[:, k].mean(), rtol=1e-12)
        np.testing.assert_allclose(blended["shift"][k] + blended["offset"][k], mean, rtol=1e-12)
        np.testing.assert_allclose(blended["scatter"][k], scatter, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_component_in_99_dimensions_is_the_gaussian_mle(dtype):
    """K = 1, d = 99, n = 100: Sigma = S + reg I, l = -n/2 (d log 2 pi + log|Sigma| + tr(Sigma^-1 S))."""
    x = np.random.default_rng(2).normal(size=(100, 99)).astype(np.float32).astype(np.float64)
    _, loglik = fit(x, 1, "full", dtype)
    sigma = np.cov(x.T, bias=True) + 1e-6 * np.eye(99)
    expected = -50 * (99 * math.log(2 * math.pi) + np.linalg.slogdet(sigma)[1]
                      + np.trace(np.linalg.solve(sigma, np.cov(x.T, bias=True))))
    assert loglik == pytest.approx(expected, rel=1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
def test_a_constant_column_sits_on_the_floor_and_matches_scikit_learn(covariance):
    """A constant second column: its variance is reg_covar in each component, as in scikit-learn."""
    rng = np.random.default_rng(4)
    x = np.stack([np.concatenate([rng.normal(0, 1, 50), rng.normal(6, 1, 50)]), np.full(100, 2.0)], -1)
    init = start(np.asarray(x), covariance, 1.0)
    both = r"covariances\[0\] .*columns \[1\].*covariances\[1\] .*columns \[1\]"
    floored = None if covariance == "spherical" else both
    gm, loglik = fit(x, 2, covariance, torch.float64, init=init, tol=1e-12, floored=floored)
    precisions = np.linalg.inv(init["covariances"]) if covariance == "full" else 1 / init["covariances"]
    sk = SkGaussianMixture(2, covariance_type=covariance, weights_init=init["weights"],
                           means_init=init["locs"], precisions_init=precisions, tol=1e-14,
                           max_iter=5000).fit(x)
    assert loglik == pytest.approx(sk.score(x) * len(x), rel=1e-8)
    if covariance != "spherical":
        np.testing.assert_allclose(eigenvalues(gm).min(), 1e-6, rtol=1e-6)


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
def test_a_collapsed_component_without_a_floor_is_refused(covariance):
    """reg_covar = 0 and a component on one point: the likelihood has no maximum (variance -> 0)."""
    gm = GaussianMixture(2, 1, covariance, reg_covar=0.0)
    with pytest.raises(freqvi.errors.FreqviInputError, match=r"components \[0, 1\] have a singular"):
        freqvi.em(gm, data=torch.tensor([[9999.0], [0.0]]), progress=False)

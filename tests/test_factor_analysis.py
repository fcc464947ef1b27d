"""Factor analysis and PPCA: Gaussian marginal, Tipping-Bishop closed form, scikit-learn."""

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy.stats import multivariate_normal
from simulate import factor_data
from sklearn.decomposition import FactorAnalysis as SkFactorAnalysis

import freqvi
from freqvi.estimators import QFunctionELBO
from freqvi.models import FactorAnalysis

IGNORE_MAX_ITER = pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")


def start(d=5, q=2, noise="diagonal"):
    g = torch.Generator().manual_seed(7)
    psi = np.ones(d) if noise == "diagonal" else np.float64(1.0)
    return {"mean": np.zeros(d), "loading": torch.randn(d, q, generator=g).numpy(), "noise_variance": psi}


def gaussian_log_likelihood(x, mean, loading, noise_variance):
    """Independent reference: log N(x; mu, W W^T + Psi) by scipy."""
    cov = loading @ loading.T + np.diag(np.broadcast_to(noise_variance, mean.shape))
    return multivariate_normal(mean, cov).logpdf(x).sum()


def test_exact_posterior_elbo_equals_gaussian_marginal():
    x = factor_data()
    fa = FactorAnalysis(5, 2, init=start())
    elbo = -Trace_ELBO(num_particles=3).loss(fa.model, fa.guide, x)
    reference = gaussian_log_likelihood(x.numpy(), **start())
    assert elbo == pytest.approx(reference, rel=1e-5)


@IGNORE_MAX_ITER
@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("m_step", ["closed_form", "gradient"])
def test_em_ascent_property(noise, m_step):
    x = factor_data(n=300)
    fa = FactorAnalysis(5, 2, noise, init=start(noise=noise))
    iters = 30 if m_step == "closed_form" else 5
    result = freqvi.em(fa, x, m_step=m_step, max_iter=iters, tol=0.0, progress=False, num_particles=64)
    path = np.array(result.log_likelihood)
    assert path[-1] > path[0] + 10.0
    if m_step == "closed_form":
        assert np.all(np.diff(path) >= -1e-9 * np.abs(path[1:]))
    else:  # the M-step maximises a Monte-Carlo Q; the path is the exact log-likelihood
        assert np.all(np.diff(path) > 0)


def test_fisher_identity_within_monte_carlo_error():
    x = factor_data(n=200)
    fa = FactorAnalysis(5, 2, init=start())
    fa.model(x)
    params = [fa.mean_unconstrained, fa.loading_unconstrained, fa.noise_variance_unconstrained]
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(fa.log_marginal(x).sum(), params)])
    q = QFunctionELBO(num_particles=200, max_plate_nesting=1)
    draws = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            -q.differentiable_loss(fa.model, fa.guide, x), params)])
        for _ in range(20)
    ])
    mean, se = draws.mean(0), draws.std(0) / 20 ** 0.5
    assert torch.all((mean - exact).abs() <= 4 * se + 1e-8 * exact.abs())
    assert exact.abs().max() > 10.0


def tipping_bishop(x, q):
    """Closed-form PPCA MLE (Tipping and Bishop 1999) and its log-likelihood."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    s = np.cov(x.T, bias=True)
    evals, evecs = np.linalg.eigh(s)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    sigma2 = evals[q:].mean()
    w = evecs[:, :q] * np.sqrt(evals[:q] - sigma2)
    return gaussian_log_likelihood(x, mean, w, sigma2), sigma2


def test_ppca_reaches_tipping_bishop_mle():
    x = factor_data(n=400, isotropic=True)
    fa = FactorAnalysis(5, 2, "isotropic", init=start(noise="isotropic"))
    freqvi.em(fa, x, tol=1e-10, max_iter=5000, progress=False)
    reference, sigma2 = tipping_bishop(x, 2)
    n = x.shape[0]
    ours = freqvi.log_likelihood(fa, x).total
    assert abs(ours - reference) / n < 1e-4
    assert float(fa.noise_variance.detach()) == pytest.approx(sigma2, rel=1e-3)


def test_direct_maximisation_reaches_the_tipping_bishop_mle():
    x = factor_data(n=400, isotropic=True)
    fa = FactorAnalysis(5, 2, "isotropic", init=start(noise="isotropic"))
    result = freqvi.maximize_likelihood(fa, x)
    reference, sigma2 = tipping_bishop(x, 2)
    assert result.converged
    assert result.log_likelihood == pytest.approx(reference, abs=1e-8 * x.shape[0])
    assert freqvi.log_likelihood(fa, x).total == pytest.approx(result.log_likelihood, abs=1e-9)
    assert float(fa.noise_variance.detach()) == pytest.approx(sigma2, rel=1e-6)


def test_factor_analysis_matches_scikit_learn():
    x = factor_data(n=500)
    fa = FactorAnalysis(5, 2, init=start())
    freqvi.em(fa, x, tol=1e-10, max_iter=5000, progress=False)
    sk = SkFactorAnalysis(2, tol=1e-10, max_iter=10000).fit(x.numpy())
    ours = freqvi.log_likelihood(fa, x).total / x.shape[0]
    assert ours == pytest.approx(sk.score(x.numpy()), abs=1e-3)
    np.testing.assert_allclose(fa.noise_variance.detach(), sk.noise_variance_, rtol=1e-2)


def test_mean_field_guide_gives_a_lower_bound():
    x = factor_data(n=100)
    fa = FactorAnalysis(5, 2, init=start())
    exact = freqvi.log_likelihood(fa, x).total
    guide = fa.mean_field_guide()
    frozen = poutine.block(fa.model, hide_types=["param"])
    result = freqvi.fit(frozen, x, guide, loss="mean_field", lr=0.05, num_steps=1500, progress=False)
    est = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    elbo = -est.loss(frozen, guide, x)
    assert elbo < exact  # a diagonal q cannot match the correlated posterior: KL > 0
    assert elbo > result.elbo[0]
    assert exact - elbo < 0.1 * (exact - result.elbo[0])


@pytest.mark.parametrize("driver", ["em", "fit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_column_is_refused_by_name(dtype, driver):
    """Issue 15 item 5: with x_4 = 3.0 the likelihood has no maximum (psi_4 -> 0)."""
    x = np.random.default_rng(0).normal(size=(200, 4))
    x[:, 3] = 3.0
    fa, data = FactorAnalysis(4, 1), torch.as_tensor(x, dtype=dtype)
    with pytest.raises(freqvi.errors.FreqviInputError, match=r"columns \[3\] of the data are constant"):
        if driver == "em":
            freqvi.em(fa, data=data, progress=False)
        else:
            freqvi.fit(fa, guide=fa.guide, data=data, num_steps=5, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dependent_columns_are_refused_where_the_likelihood_is_unbounded(dtype):
    """A duplicated column: diagonal noise can vanish on both (the em fit reached 2337 nats, no
    warning); isotropic noise with rank 3 > q = 1 is bounded, with rank 3 <= q = 3 it is not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    x[:, 3] = x[:, 0]
    data = torch.as_tensor(x, dtype=dtype)
    refused = r"combination \[-1.0, 1.0\] of columns \[0, 3\] is constant"
    with pytest.raises(freqvi.errors.FreqviInputError, match=refused):
        freqvi.em(FactorAnalysis(4, 1), data=data, progress=False)
    freqvi.em(FactorAnalysis(4, 1, "isotropic"), data=data, progress=False)
    with pytest.raises(freqvi.errors.FreqviInputError, match=r"rank 3 < 4"):
        freqvi.em(FactorAnalysis(4, 3, "isotropic"), data=data, progress=False)


def test_as_many_factors_as_columns_is_bounded_and_fits_the_sample_covariance():
    """latent_dim = dim: W W^T + Psi can equal the (nonsingular) sample covariance S, the MLE."""
    x = torch.as_tensor(np.random.default_rng(1).normal(size=(300, 3)) @ np.diag([1.0, 2.0, 0.5]))
    fa = FactorAnalysis(3, 3)
    freqvi.em(fa, data=x, tol=1e-9, max_iter=20000, progress=False)
    sample = np.cov(x.numpy().T, bias=True)
    reference = multivariate_normal(x.numpy().mean(0), sample).logpdf(x.numpy()).sum()
    assert float(fa.log_marginal(x).detach().sum()) == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_float32_at_a_large_offset_matches_float64_from_the_same_start(noise):
    """Data at 1e4 with unit-scale structure: raw second moments would cancel in float32.

    The float32 means lie within half a spacing (4.9e-4) of the float64 ones, which
    costs at most 300 * 5 * (4.9e-4)^2 / (2 * 0.09) = 2e-3 nats, below the 0.01 compared.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 5)) + 0.3 * rng.normal(size=(300, 5)) + 1e4
    x = x.astype(np.float32).astype(np.float64)  # both precisions see the same values
    reference = FactorAnalysis(5, 2, noise)
    reference.model(torch.as_tensor(x))  # the principal-component start, in float64
    init = {k: v.numpy() for k, v in reference.estimates().items()}
    loglik = {}
    for dtype in (torch.float32, torch.float64):
        fa = FactorAnalysis(5, 2, noise, init=init)
        data = torch.as_tensor(x, dtype=dtype)
        freqvi.em(fa, data=data, tol=1e-7, max_iter=5000, progress=False)
        loglik[dtype] = float(fa.log_marginal(data).detach().double().sum())
    assert loglik[torch.float32] == pytest.approx(loglik[torch.float64], abs=0.01)


@IGNORE_MAX_ITER
@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_online_em_in_float32_at_a_large_offset_follows_float64(noise):
    """Online EM over the same 6 minibatches per pass in both precisions, from the same start.

    The bound on the float32 means' rounding is the previous test's, 2e-3 nats.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 5)) + 0.3 * rng.normal(size=(300, 5)) + 1e4
    x = x.astype(np.float32).astype(np.float64)
    reference = FactorAnalysis(5, 2, noise)
    reference.model(torch.as_tensor(x))
    init = {k: v.numpy() for k, v in reference.estimates().items()}
    loglik = {}
    for dtype in (torch.float32, torch.float64):
        fa = FactorAnalysis(5, 2, noise, init=init)
        data = torch.as_tensor(x, dtype=dtype)
        batches = list(torch.split(data, 50))  # a fixed order: the random permutation may differ by dtype
        freqvi.em(fa, data=Passes(batches), num_observations=300, max_iter=20, tol=0.0, progress=False)
        loglik[dtype] = float(fa.log_marginal(data).detach().double().sum())
    assert loglik[torch.float32] == pytest.approx(loglik[torch.float64], abs=0.01)


class Passes:
    """An iterable that starts over on every pass, as a DataLoader does."""

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)

"""IWAE, DReG and STL against closed forms, the exact log-likelihood and each other."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from simulate import factor_data

import freqvi
from freqvi import gradient_variance
from freqvi.errors import FreqviInputError
from freqvi.estimators import IWAE_ELBO, STL_ELBO, DReG_ELBO
from freqvi.guides import AmortizedNormal
from freqvi.models import FactorAnalysis

N, D, Q = 40, 5, 2


@pytest.fixture
def fitted():
    """Factor analysis at its MLE on float64 data, and the exact posterior there."""
    x = factor_data(n=N).double()
    fa = FactorAnalysis(D, Q)
    freqvi.em(fa, x, progress=False)
    with torch.no_grad():
        posterior = fa.posterior(x)
    return fa, x, posterior


def diagonal_guide(x):
    """q(z_i) = N(m_i, diag s_i^2), free per observation."""
    m = pyro.param("m", lambda: torch.zeros(N, Q, dtype=x.dtype))
    s = pyro.param("s", lambda: torch.ones(N, Q, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]) as i:
        pyro.sample("factors", dist.Normal(m[i], s[i]).to_event(1))


def full_guide(x):
    """q(z_i) = N(m_i, L L^T): contains the exact posterior of factor analysis."""
    m = pyro.param("m", lambda: torch.zeros(N, Q, dtype=x.dtype))
    tril = pyro.param("tril", lambda: torch.eye(Q, dtype=x.dtype), constraint=constraints.lower_cholesky)
    with pyro.plate("data", x.shape[0]) as i:
        pyro.sample("factors", dist.MultivariateNormal(m[i], scale_tril=tril))


def set_diagonal_guide(posterior, shrink=1.0):
    """The diagonal guide at the posterior means and (shrunk) marginal scales."""
    pyro.param("m", posterior.mean.clone())
    pyro.param("s", shrink * posterior.variance.sqrt().clone(), constraint=constraints.positive)


def closed_form_elbo(fa, x) -> float:
    """ELBO of the diagonal guide in closed form: E_q log N(x; mu + W z, Psi) - KL(q || N(0, I))."""
    m, s = pyro.param("m").detach(), pyro.param("s").detach()
    mean, loading = fa.mean.detach(), fa.loading.detach()
    psi = fa.noise_variance.detach().expand(D)
    resid = x - mean - m @ loading.T
    expected_sq = resid.square() + s.square() @ loading.square().T
    loglik = -0.5 * (torch.log(2 * math.pi * psi) + expected_sq / psi).sum()
    kl = 0.5 * (s.square() + m.square() - 1 - 2 * s.log()).sum()
    return float(loglik - kl)


def draws(estimator, model, guide, x, num=200):
    values = torch.tensor([-estimator.loss(model, guide, x) for _ in range(num)], dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(num))


@pytest.mark.parametrize("estimator", [Trace_ELBO(), TraceMeanField_ELBO(), STL_ELBO(), IWAE_ELBO()],
                         ids=["trace", "mean_field", "stl", "iwae-1"])
def test_elbo_estimators_agree_with_the_closed_form(fitted, estimator):
    fa, x, posterior = fitted
    set_diagonal_guide(posterior, shrink=0.7)
    mean, se = draws(estimator, fa.model, diagonal_guide, x)
    reference = closed_form_elbo(fa, x)
    assert abs(mean - reference) < 4 * se + 1e-9, (mean, se, reference)


def test_iwae_with_one_particle_is_the_elbo_draw_for_draw(fitted):
    fa, x, posterior = fitted
    set_diagonal_guide(posterior)
    pyro.set_rng_seed(3)
    elbo = Trace_ELBO().loss(fa.model, diagonal_guide, x)
    pyro.set_rng_seed(3)
    iwae = IWAE_ELBO(num_particles=1, max_plate_nesting=1).loss(fa.model, diagonal_guide, x)
    assert iwae == pytest.approx(elbo, rel=1e-12)


def test_iwae_increases_with_k_towards_the_log_likelihood(fitted):
    fa, x, posterior = fitted
    set_diagonal_guide(posterior, shrink=0.7)
    exact = freqvi.log_likelihood(fa, x).total
    bounds = {k: draws(IWAE_ELBO(num_particles=k), fa.model, diagonal_guide, x, num=30)
              for k in (1, 10, 100, 1000)}
    ks = sorted(bounds)
    for small, large in itertools.pairwise(ks):
        (lo, se_lo), (hi, se_hi) = bounds[small], bounds[large]
        assert hi - lo > -4 * math.hypot(se_lo, se_hi), (small, large, bounds)
    for value, se in bounds.values():
        assert value < exact + 4 * se
    gap = {k: exact - bounds[k][0] for k in ks}
    assert gap[1000] < 0.05 * gap[1], gap


def chi_square_z(a, b) -> tuple[float, int]:
    """Sum of squared z-scores of two independent mean estimates, and their count."""
    z = (a.mean - b.mean) / (a.standard_error.square() + b.standard_error.square()).sqrt()
    return float(z.square().sum()), z.numel()


def test_dreg_guide_gradient_has_iwae_expectation_and_lower_variance(fitted):
    fa, x, posterior = fitted
    set_diagonal_guide(posterior, shrink=0.7)
    iwae = gradient_variance(fa.model, x, diagonal_guide, IWAE_ELBO(num_particles=10), num_draws=300)
    dreg = gradient_variance(fa.model, x, diagonal_guide, DReG_ELBO(num_particles=10), num_draws=300)
    for name in ("m", "s"):
        assert dreg[name].owner == "guide"
        statistic, count = chi_square_z(dreg[name], iwae[name])
        assert statistic < count + 4 * math.sqrt(2 * count), name  # chi-square, count dof
        assert dreg[name].variance.sum() < iwae[name].variance.sum(), name


def test_dreg_model_gradient_is_iwae_gradient_draw_for_draw(fitted):
    fa, x, posterior = fitted
    set_diagonal_guide(posterior)
    grads = []
    for estimator in (IWAE_ELBO(num_particles=5, max_plate_nesting=1),
                      DReG_ELBO(num_particles=5, max_plate_nesting=1)):
        pyro.set_rng_seed(4)
        loss = estimator.differentiable_loss(fa.model, diagonal_guide, x)
        grads.append(torch.autograd.grad(loss, [fa.loading_unconstrained, pyro.param("m")]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grads[0][1], grads[1][1])  # the guide's gradients differ


def test_stl_guide_gradient_vanishes_at_the_exact_posterior(fitted):
    fa, x, posterior = fitted
    pyro.param("m", posterior.mean.clone())
    pyro.param("tril", posterior.scale_tril[0].clone(), constraint=constraints.lower_cholesky)
    trace = gradient_variance(fa.model, x, full_guide, Trace_ELBO(), num_draws=50)
    stl = gradient_variance(fa.model, x, full_guide, STL_ELBO(), num_draws=50)
    for name in ("m", "tril"):
        assert trace[name].variance.sum() > 1e-3
        assert stl[name].variance.sum() < trace[name].variance.sum() / 10
        assert stl[name].variance.sum() < 1e-12  # log p(x, z) - log q(z) = log p(x) for every z


def subsampled_model(x, batch_size):
    """A one-site-per-observation model with a subsampling plate."""
    loc = pyro.param("loc", torch.tensor(0.3, dtype=x.dtype))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as i:
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x[i])


def subsampled_guide(x, batch_size):
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as i:
        pyro.sample("z", dist.Normal(0.8 * x[i], 0.45))


@pytest.mark.parametrize("estimator", [IWAE_ELBO(num_particles=20), DReG_ELBO(num_particles=20),
                                       STL_ELBO(num_particles=20)], ids=["iwae", "dreg", "stl"])
def test_minibatch_estimates_are_unbiased_for_the_full_data(estimator):
    x = torch.linspace(-2, 2, 30, dtype=torch.float64)
    full, se_full = _draws_with(estimator, x, None, 200)
    batch, se_batch = _draws_with(estimator, x, 5, 2000)
    assert abs(full - batch) < 4 * math.hypot(se_full, se_batch)


def _draws_with(estimator, x, batch_size, num):
    values = torch.tensor([-estimator.loss(subsampled_model, subsampled_guide, x, batch_size)
                           for _ in range(num)], dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(num))


@pytest.mark.parametrize("cls", [IWAE_ELBO, DReG_ELBO, STL_ELBO])
def test_num_particles_must_be_a_positive_integer(cls):
    with pytest.raises(FreqviInputError, match="num_particles must be an integer >= 1; got 0"):
        cls(num_particles=0)


class LinearEncoder(torch.nn.Module):
    """``loc = x A + b``, ``scale = exp(s)``: the exact posterior family of one-factor PPCA."""

    def __init__(self, dim):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1).double()
        self.log_scale = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return self.linear(x), self.log_scale.exp().expand(x.shape[0], 1)


@pytest.mark.parametrize("estimator", [STL_ELBO(num_particles=4), DReG_ELBO(num_particles=4)],
                         ids=["stl", "dreg"])
def test_path_derivative_gradients_of_an_encoder_vanish_at_the_exact_posterior(estimator):
    x = factor_data(n=N).double()
    fa = FactorAnalysis(D, 1, "isotropic")
    freqvi.em(fa, x, progress=False)
    with torch.no_grad():
        posterior = fa.posterior(x)  # loc linear in x, one shared variance
        design = torch.cat([x, torch.ones(N, 1, dtype=x.dtype)], 1)
        slope = torch.linalg.lstsq(design, posterior.mean).solution
    encoder = LinearEncoder(D)
    with torch.no_grad():
        encoder.linear.weight.copy_(slope[:D].T)
        encoder.linear.bias.copy_(slope[D])
        encoder.log_scale.copy_(posterior.scale_tril[0, 0, 0].log())
    guide = AmortizedNormal(fa.model, encoder)
    moments = gradient_variance(fa.model, x, guide, estimator, num_draws=20)
    encoder_grads = [m for m in moments.values() if m.owner == "guide"]
    assert len(encoder_grads) == 3
    for m in encoder_grads:
        assert m.variance.max() < 1e-16 and m.mean.abs().max() < 1e-6
    trace = gradient_variance(fa.model, x, guide, Trace_ELBO(), num_draws=20)
    assert max(float(m.variance.max()) for m in trace.values() if m.owner == "guide") > 1e-3


def _rows_model(x):
    """z_i ~ N(mu, 1), x_i ~ N(z_i, 1), in a plate called "rows" (not the default "data")."""
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("rows", x.shape[0]) as r:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[r])


def _rows_guide(x):
    """N(x_i / 2, 1): the exact posterior's mean at mu = 0, a wider scale (its sd is 0.71)."""
    with pyro.plate("rows", x.shape[0]) as r:
        pyro.sample("z", dist.Normal(x[r] / 2, 1.0))


def test_gradient_variance_builds_an_estimator_on_the_drivers_data_plate():
    """IWAE by name takes data_plate_name as its observations, as an IWAE_ELBO built on that plate does
    draw for draw; its mean gradient is within 4 s.e. of the log-likelihood's, sum_i (x_i - mu) / 2."""
    x = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1
    pyro.clear_param_store()
    moments = []
    by_name, built = ("iwae", {"num_particles": 10}), (IWAE_ELBO(num_particles=10, data_plate="rows"), {})
    for loss, options in (by_name, built):
        pyro.set_rng_seed(3)
        moments.append(gradient_variance(_rows_model, x, _rows_guide, loss, num_draws=200,
                                         data_plate_name="rows", **options)["mu"])
    torch.testing.assert_close(moments[0].mean, moments[1].mean, rtol=1e-12, atol=1e-12)
    exact = float(x.sum() / 2)  # d/dmu sum_i log N(x_i; mu, 2) at mu = 0
    assert abs(float(moments[0].mean) - exact) < 4 * float(moments[0].standard_error)
    with pytest.raises(FreqviInputError, match="no vectorised plate called 'obs'"):
        gradient_variance(_rows_model, x, _rows_guide, "iwae", num_draws=2, data_plate_name="obs")


def test_the_old_names_of_the_gradient_noise_driver_still_work():
    assert freqvi.estimators.gradient_variance is freqvi.gradient_variance is freqvi.infer.gradient_variance
    assert freqvi.estimators.GradientMoments is freqvi.GradientMoments
    with pytest.raises(AttributeError, match="no attribute 'gradient_varience'"):
        freqvi.estimators.gradient_varience  # noqa: B018 (a misspelling is not an alias)

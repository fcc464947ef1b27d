"""Pyro's autoguides (and any guide with auxiliary sites) as importance proposals: log_likelihood,
Louis's identity, information criteria and the IWAE/DReG/STL estimators, against closed forms;
point-mass proposals refused."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, autoguide
from scipy import integrate, stats

import freqvi
from freqvi import gradient_variance
from freqvi.errors import FreqviInputError
from freqvi.estimators import IWAE_ELBO, STL_ELBO, DReG_ELBO
from freqvi.infer.information import observed_information
from freqvi.infer.model_choice import information_criteria

N = 30
JOINT_GUIDES = [autoguide.AutoDiagonalNormal, autoguide.AutoMultivariateNormal,
                autoguide.AutoLowRankMultivariateNormal]
ALL_GUIDES = [autoguide.AutoNormal, *JOINT_GUIDES]


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(2.0)


def normal_model(x):
    """z_i ~ N(mu, 1), x_i ~ N(z_i, 1): x_i ~ N(mu, 2), posterior z_i | x_i ~ N((mu + x_i) / 2, 1/2)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def normal_loglik(x, mu):
    return stats.norm(mu, math.sqrt(2.0)).logpdf(x.numpy()).sum()


def lognormal_model(x):
    """z_i ~ LogNormal(mu, 1), x_i ~ N(log z_i, 1): a positive latent, so an autoguide's Delta carries
    the Jacobian of exp; log z_i | x_i ~ N((mu + x_i) / 2, 1/2) and x_i ~ N(mu, 2)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.LogNormal(mu, 1.0))
        pyro.sample("x", dist.Normal(z.log(), 1.0), obs=x)


def set_autoguide(guide, x, loc, scale):
    """Puts an autoguide at q(u) = N(loc, diag scale^2) over the unconstrained latent vector u.

    ``nn.Parameter`` attributes (loc, cov_factor) are set as parameters, ``PyroParam`` ones
    (positive scales, Cholesky factors) as constrained values.
    """
    with poutine.block():
        guide(x)  # creates its parameters
    if isinstance(guide, autoguide.AutoNormal):
        guide.locs.z, guide.scales.z = loc.clone(), scale.clone()
        return
    guide.loc, guide.scale = torch.nn.Parameter(loc.clone()), scale.clone()
    if isinstance(guide, autoguide.AutoMultivariateNormal):
        guide.scale_tril = torch.eye(len(loc), dtype=loc.dtype)
    elif isinstance(guide, autoguide.AutoLowRankMultivariateNormal):  # cov = diag(s) (F F^T + I) diag(s)
        guide.cov_factor = torch.nn.Parameter(torch.zeros(len(loc), guide.rank, dtype=loc.dtype))


def at_posterior(guide_class, model, x, mu, inflate=1.0):
    """The autoguide at the exact posterior of u = z (or log z): N((mu + x) / 2, 1/2), scale inflated."""
    pyro.param("mu", torch.tensor(mu, dtype=x.dtype))
    guide = guide_class(model)
    set_autoguide(guide, x, (mu + x) / 2, torch.full_like(x, inflate * math.sqrt(0.5)))
    return guide


@pytest.mark.parametrize("guide_class", ALL_GUIDES, ids=lambda g: g.__name__)
@pytest.mark.parametrize("model", [normal_model, lognormal_model], ids=["real", "positive"])
def test_exact_posterior_autoguide_gives_the_exact_log_likelihood(guide_class, model):
    """At the exact posterior every weight is p(x): log q must be the density of the model's latent
    values (the auxiliary draw's plus the Jacobian of exp for the positive latent), or the total moves
    by sum_i log z_i."""
    x = data()
    guide = at_posterior(guide_class, model, x, mu=0.7)
    ll = freqvi.log_likelihood(model, guide=guide, data=x, num_samples=50, proposal="guide", seed=0)
    assert ll.method == "importance"
    assert ll.total == pytest.approx(normal_loglik(x, 0.7), abs=1e-8)
    assert ll.standard_error < 1e-8
    if guide_class is autoguide.AutoNormal:  # its auxiliary sites lie in the data plate
        assert not ll.joint and ll.per_observation.shape == (N,)
        np.testing.assert_allclose(ll.per_observation.numpy(),
                                   stats.norm(0.7, math.sqrt(2.0)).logpdf(x.numpy()), atol=1e-10)
    else:  # one auxiliary vector outside the data plate: only the joint total exists
        assert ll.joint and ll.per_observation is None and ll.pareto_k.shape == (1,)
        with pytest.raises(FreqviInputError, match="do not exist"):
            ll.to_inference_data()


@pytest.mark.parametrize("guide_class", ALL_GUIDES, ids=lambda g: g.__name__)
def test_approximate_autoguide_estimate_is_within_its_standard_error(guide_class):
    x = data()
    guide = at_posterior(guide_class, lognormal_model, x, mu=0.7, inflate=1.15)
    ll = freqvi.log_likelihood(lognormal_model, guide=guide, data=x, num_samples=4000, seed=1)
    assert ll.standard_error > 1e-3
    assert abs(ll.total - normal_loglik(x, 0.7)) < 4 * ll.standard_error
    assert ll.max_pareto_k < 0.7


@pytest.mark.parametrize("guide_class", ALL_GUIDES, ids=lambda g: g.__name__)
def test_louis_standard_error_with_an_autoguide(guide_class):
    """I(mu) = n / 2 in closed form. At the exact posterior the weights are equal and Louis's
    identity is n - Var(sum_i z_i - mu) estimated from K draws, whose standard error is
    sqrt(2 / K) (n / 2) for a Gaussian score."""
    x = data()
    mu = float(x.mean())
    guide = at_posterior(guide_class, normal_model, x, mu=mu)
    k = 4000
    info = observed_information(normal_model, x, guide, method="louis", num_samples=k, seed=2)
    assert info.method == "louis"
    exact = N / 2
    assert abs(float(info.matrix) - exact) < 4 * math.sqrt(2 / k) * exact
    if guide_class is autoguide.AutoNormal:
        assert info.scores.shape == (N, 1)
        info.standard_errors("sandwich")
    else:
        assert info.scores is None
        with pytest.raises(FreqviInputError, match="sandwich"):
            info.standard_errors("sandwich")


@pytest.mark.parametrize("guide_class", [autoguide.AutoNormal, autoguide.AutoDiagonalNormal],
                         ids=lambda g: g.__name__)
def test_information_criteria_with_an_autoguide(guide_class):
    x = data()
    guide = at_posterior(guide_class, normal_model, x, mu=0.7)
    criteria = information_criteria(normal_model, x, guide, num_samples=20, proposal="guide", seed=0)
    assert criteria.num_parameters == 1  # mu: the guide's parameters are not the model's
    assert criteria.log_likelihood == pytest.approx(normal_loglik(x, 0.7), abs=1e-8)
    assert criteria.aic == pytest.approx(-2 * normal_loglik(x, 0.7) + 2, abs=1e-7)


# ----- the particle estimators -----------------------------------------------------------------

def mean_loss(estimator, model, guide, x, num=150):
    values = torch.tensor([-estimator.loss(model, guide, x) for _ in range(num)], dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(num))


def closed_form_elbo(x, mu, inflate):
    """ELBO of q(log z_i) = N(m_i, s^2), m_i = (mu + x_i) / 2, s^2 = inflate^2 / 2, in the lognormal
    model (the Jacobians cancel): log p(x) - KL(q || posterior), the KL between Gaussians."""
    ratio = inflate ** 2
    kl = 0.5 * (ratio - 1 - math.log(ratio)) * len(x)
    return normal_loglik(x, mu) - kl


@pytest.mark.parametrize("guide_class", ALL_GUIDES, ids=lambda g: g.__name__)
def test_one_particle_bounds_are_the_closed_form_elbo(guide_class):
    x = data()
    guide = at_posterior(guide_class, lognormal_model, x, mu=0.7, inflate=1.3)
    reference = closed_form_elbo(x, 0.7, 1.3)
    for estimator in (IWAE_ELBO(num_particles=1), STL_ELBO(num_particles=4), Trace_ELBO()):
        mean, se = mean_loss(estimator, lognormal_model, guide, x)
        assert abs(mean - reference) < 4 * se, (type(estimator).__name__, mean, se, reference)


@pytest.mark.parametrize("guide_class", [autoguide.AutoNormal, autoguide.AutoDiagonalNormal],
                         ids=lambda g: g.__name__)
@pytest.mark.parametrize("estimator", [STL_ELBO(num_particles=3), DReG_ELBO(num_particles=3)],
                         ids=["stl", "dreg"])
def test_path_derivative_guide_gradient_vanishes_at_the_exact_posterior(guide_class, estimator):
    """log p(x, z) - log q(z) = log p(x) for every draw: the path derivative of the weight is zero
    only if the Jacobian of exp in the autoguide's Delta stays attached to the draw."""
    x = data()
    guide = at_posterior(guide_class, lognormal_model, x, mu=0.7)
    moments = gradient_variance(lognormal_model, x, guide, estimator, num_draws=5)
    guide_params = [m for m in moments.values() if m.owner == "guide"]
    assert guide_params
    for m in guide_params:
        assert float(m.mean.abs().max()) < 1e-10 and float(m.variance.max()) < 1e-18


def chi_square_z(a, b) -> tuple[float, int]:
    z = (a.mean - b.mean) / (a.standard_error.square() + b.standard_error.square()).sqrt()
    return float(z.square().sum()), z.numel()


def test_dreg_guide_gradient_has_the_iwae_expectation_with_a_joint_autoguide():
    """The DReG hook multiplies the gradient reaching the auxiliary draw once: hooking its Delta sites
    as well would weight the path term twice and move the expectation away from IWAE's."""
    x = data(n=8)
    guide = at_posterior(autoguide.AutoDiagonalNormal, lognormal_model, x, mu=0.7, inflate=0.6)
    iwae = gradient_variance(lognormal_model, x, guide, IWAE_ELBO(num_particles=5), num_draws=200)
    dreg = gradient_variance(lognormal_model, x, guide, DReG_ELBO(num_particles=5), num_draws=200)
    for name in ("AutoDiagonalNormal.loc", "AutoDiagonalNormal.scale"):
        statistic, count = chi_square_z(dreg[name], iwae[name])
        assert statistic < count + 4 * math.sqrt(2 * count), name


# ----- point masses are no proposal ------------------------------------------------------------

def poisson_lognormal(x):
    """z_i ~ N(mu, sigma^2), x_i ~ Poisson(exp(z_i))."""
    mu = pyro.param("mu", torch.tensor(1.0, dtype=x.dtype))
    sigma = pyro.param("sigma", torch.tensor(0.5, dtype=x.dtype), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, sigma))
        pyro.sample("x", dist.Poisson(z.exp()), obs=x)


def poisson_lognormal_quadrature(x, mu=1.0, sigma=0.5) -> float:
    def marginal(count):
        def integrand(z):
            return math.exp(stats.norm.logpdf(z, mu, sigma) + stats.poisson.logpmf(count, math.exp(z)))
        return math.log(integrate.quad(integrand, mu - 10 * sigma, mu + 10 * sigma, epsabs=0, limit=200)[0])
    values, repeats = np.unique(x.numpy(), return_counts=True)
    return sum(r * marginal(c) for c, r in zip(values.tolist(), repeats.tolist(), strict=True))


def counts(n=200, mu=1.0, sigma=0.5, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.poisson((mu + sigma * torch.randn(n, generator=g, dtype=torch.float64)).exp(), generator=g)


def test_autodelta_is_refused_and_a_normal_proposal_meets_quadrature():
    x = counts()
    reference = poisson_lognormal_quadrature(x)
    delta = autoguide.AutoDelta(poisson_lognormal)
    with pytest.raises(FreqviInputError, match=r"point mass.*\['z'\].*AutoNormal"):
        freqvi.log_likelihood(poisson_lognormal, guide=delta, data=x)
    with pytest.raises(FreqviInputError, match="point mass"):
        observed_information(poisson_lognormal, x, delta, method="louis")
    with pytest.raises(FreqviInputError, match="point mass"):
        IWAE_ELBO(num_particles=4).loss(poisson_lognormal, delta, x)
    # the proposal to use instead: a Gaussian around each posterior's mode (a Laplace step), inflated
    mode = torch.full_like(x, 1.0)
    for _ in range(50):  # Newton on log p(x_i | z) + log N(z; 1, 0.25)
        mode = mode - ((x - mode.exp() - (mode - 1.0) / 0.25) / (-mode.exp() - 1 / 0.25))
    scale = 1.2 / (mode.exp() + 1 / 0.25).sqrt()
    normal = autoguide.AutoNormal(poisson_lognormal)
    set_autoguide(normal, x, mode, scale)
    ll = freqvi.log_likelihood(poisson_lognormal, guide=normal, data=x, num_samples=1000, seed=0)
    assert abs(ll.total - reference) < 4 * ll.standard_error + 1e-6, (ll.total, ll.standard_error, reference)


def test_a_hand_written_point_mass_is_refused():
    def delta_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Delta(x.clone()))

    with pytest.raises(FreqviInputError, match=r"point mass.*\['z'\]"):
        freqvi.log_likelihood(normal_model, guide=delta_guide, data=data())
    with pytest.raises(FreqviInputError, match="point mass"):
        STL_ELBO(num_particles=2).loss(normal_model, delta_guide, data())


def test_a_point_mass_among_auxiliary_draws_is_named():
    """AutoGuideList: an AutoDiagonalNormal's Deltas carry its auxiliary draw (they change from draw to
    draw); an AutoDelta's stay put and are refused, by name."""
    def model(x):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + w, 1.0), obs=x)

    guide = autoguide.AutoGuideList(model)
    guide.append(autoguide.AutoDiagonalNormal(poutine.block(model, expose=["z"])))
    guide.append(autoguide.AutoDelta(poutine.block(model, expose=["w"])))
    with pytest.raises(FreqviInputError, match=r"\['w'\]"):
        freqvi.log_likelihood(model, guide=guide, data=data())


def test_an_auxiliary_autoguide_list_is_a_proposal():
    """Two AutoDiagonalNormals in an AutoGuideList: the weight subtracts both auxiliary densities."""
    def model(x):
        mu = pyro.param("mu", torch.tensor(0.7, dtype=x.dtype))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            w = pyro.sample("w", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            pyro.sample("y", dist.Normal(w.log(), 1.0), obs=x)

    x = data()
    guide = autoguide.AutoGuideList(model)
    for site in ("z", "w"):
        guide.append(autoguide.AutoDiagonalNormal(poutine.block(model, expose=[site])))
    with poutine.block():
        guide(x)
    for part, loc in zip(guide, ((0.7 + x) / 2, x / 2), strict=True):
        part.loc, part.scale = torch.nn.Parameter(loc), torch.full_like(x, 0.5 ** 0.5)
    ll = freqvi.log_likelihood(model, guide=guide, data=x, num_samples=20, proposal="guide", seed=0)
    assert ll.joint
    assert ll.total == pytest.approx(normal_loglik(x, 0.7) + normal_loglik(x, 0.0), abs=1e-8)


def test_compare_fits_an_autoguide_pair():
    """compare with fit and AutoNormal: the table's log-likelihood is log_likelihood's estimate with the
    fitted guide (same seed), within 4 of its standard errors of the closed form at the fitted mu."""
    x = data()
    guide = autoguide.AutoNormal(normal_model)
    table = freqvi.infer.model_choice.compare({"normal": (normal_model, guide)}, x, fit=freqvi.fit,
                                              num_steps=100, lr=0.05, num_samples=500, seed=0)
    assert table.loc["normal", "num_parameters"] == 1
    ll = freqvi.log_likelihood(normal_model, guide=guide, data=x, num_samples=500, seed=0)
    assert table.loc["normal", "log_likelihood"] == pytest.approx(ll.total, abs=1e-9)
    assert abs(ll.total - normal_loglik(x, pyro.param("mu").item())) < 4 * ll.standard_error


@pytest.mark.slow
@pytest.mark.parametrize("guide_class", [autoguide.AutoNormal, autoguide.AutoDiagonalNormal],
                         ids=lambda g: g.__name__)
def test_fit_with_an_autoguide_reaches_the_mle(guide_class):
    """Both guide families contain the exact posterior, so the ELBO's maximiser in mu is the MLE,
    mean(x). After a warm-up, twenty further stretches of SVI record mu: their mean is within 4 of
    their standard deviations (the optimiser's own jitter) of mean(x), and log_likelihood with the
    fitted guide then matches the closed form within 4 standard errors."""
    x = data()
    guide = guide_class(normal_model)
    freqvi.fit(normal_model, guide=guide, data=x, num_steps=2000, lr=0.05, progress=False, seed=0)
    path = []
    for _ in range(20):
        freqvi.fit(normal_model, guide=guide, data=x, num_steps=25, lr=0.01, progress=False)
        path.append(pyro.param("mu").item())
    assert abs(np.mean(path) - x.mean().item()) < 4 * np.std(path, ddof=1), (path, x.mean())
    ll = freqvi.log_likelihood(normal_model, guide=guide, data=x, num_samples=2000, seed=0)
    assert abs(ll.total - normal_loglik(x, path[-1])) < 4 * ll.standard_error

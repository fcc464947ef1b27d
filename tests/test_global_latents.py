"""Latent sites outside the data plate: the joint importance weight (total, standard error, one
k-hat), exact enumeration of a shared discrete latent, and Louis's identity on the joint, against
numpy/scipy references."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import autoguide
from scipy import optimize, special, stats

import freqvi
from freqvi.errors import FreqviInputError, UnestimableParetoKWarning
from freqvi.infer.information import observed_information

J, M, PRIOR_SD = 12, 4, 10.0


def hierarchical(x):
    """mu ~ N(0, 10^2) shared by all groups; z_j ~ N(mu, tau^2); x_jk ~ N(z_j, sigma^2), k = 1..M."""
    tau = pyro.param("tau", torch.tensor(1.0, dtype=x.dtype), constraint=dist.constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=x.dtype), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=x.dtype), PRIOR_SD))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, tau))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), sigma).to_event(1), obs=x)


def groups(seed=0):
    rng = np.random.default_rng(seed)
    z = 3.0 + 1.5 * rng.standard_normal(J)
    return torch.tensor(z[:, None] + 0.8 * rng.standard_normal((J, M)))


def marginal_covariance(tau, sigma):
    blocks = np.kron(np.eye(J), np.ones((M, M)))
    return PRIOR_SD**2 * np.ones((J * M, J * M)) + tau**2 * blocks + sigma**2 * np.eye(J * M)


def exact_loglik(x, tau, sigma) -> float:
    """x (flattened) ~ N(0, 10^2 11^T + tau^2 blockdiag(11^T) + sigma^2 I)."""
    covariance = marginal_covariance(tau, sigma)
    return stats.multivariate_normal(np.zeros(J * M), covariance).logpdf(x.numpy().ravel())


def posterior(x, tau, sigma):
    """The joint Gaussian posterior of (mu, z_1..z_J): mean and covariance."""
    prior = np.zeros((J + 1, J + 1))
    prior[0, 0] = PRIOR_SD**2
    prior[0, 1:] = prior[1:, 0] = PRIOR_SD**2
    prior[1:, 1:] = PRIOR_SD**2 + tau**2 * np.eye(J)
    precision = np.linalg.inv(prior)
    precision[1:, 1:] += M / sigma**2 * np.eye(J)
    covariance = np.linalg.inv(precision)
    linear = np.concatenate([[0.0], x.numpy().sum(1) / sigma**2])
    return covariance @ linear, covariance


def set_params(tau, sigma):
    store = pyro.get_param_store()
    for name, value in (("tau", tau), ("sigma", sigma)):
        if name in store:
            del store[name]
        pyro.param(name, torch.tensor(value, dtype=torch.float64), constraint=dist.constraints.positive)


def exact_posterior_guide(x, tau, sigma):
    """AutoMultivariateNormal over (mu, z) at the exact joint posterior."""
    mean, cov = posterior(x, tau, sigma)
    guide = autoguide.AutoMultivariateNormal(hierarchical)
    with poutine.block():
        guide(x)
    tril = torch.linalg.cholesky(torch.tensor(cov))
    guide.loc = torch.nn.Parameter(torch.tensor(mean))
    guide.scale = tril.diagonal().clone()
    guide.scale_tril = tril / tril.diagonal().unsqueeze(-1)  # unit diagonal; Pyro scales its rows
    return guide


def mean_field_guide(x, tau, sigma, inflate=1.0):
    """AutoNormal with the exact posterior's means and marginal standard deviations (inflated)."""
    mean, cov = posterior(x, tau, sigma)
    sd = inflate * np.sqrt(np.diag(cov))
    guide = autoguide.AutoNormal(hierarchical)
    with poutine.block():
        guide(x)
    guide.locs.mu, guide.scales.mu = torch.tensor(mean[0]), torch.tensor(sd[0])
    guide.locs.z, guide.scales.z = torch.tensor(mean[1:]), torch.tensor(sd[1:])
    return guide


def test_a_global_latent_gives_the_joint_total_with_an_exact_proposal():
    x = groups()
    set_params(1.3, 0.9)
    guide = exact_posterior_guide(x, 1.3, 0.9)
    ll = freqvi.log_likelihood(hierarchical, guide=guide, data=x, num_samples=30, seed=0, proposal="guide")
    assert ll.joint and ll.per_observation is None and ll.pareto_k.shape == (1,)
    assert ll.total == pytest.approx(exact_loglik(x, 1.3, 0.9), abs=1e-7)
    assert ll.standard_error < 1e-7


def test_a_global_latent_with_a_mean_field_proposal_is_within_its_standard_error():
    x = groups()
    set_params(1.3, 0.9)
    guide = mean_field_guide(x, 1.3, 0.9, inflate=1.2)
    ll = freqvi.log_likelihood(hierarchical, guide=guide, data=x, num_samples=4000, seed=1)
    assert ll.joint and ll.standard_error > 1e-3
    assert abs(ll.total - exact_loglik(x, 1.3, 0.9)) < 4 * ll.standard_error
    assert ll.max_pareto_k < 0.7


def mle(x):
    result = optimize.minimize(lambda v: -exact_loglik(x, *np.exp(v)), np.zeros(2), method="Nelder-Mead",
                               options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
    return np.exp(result.x)


def finite_difference_information(x, tau, sigma, h=1e-4) -> np.ndarray:
    """-Hessian of the exact marginal in (log sigma, log tau), the order of freqvi's sorted names."""
    def f(v):
        return exact_loglik(x, math.exp(v[1]), math.exp(v[0]))

    v0 = np.log([sigma, tau])
    hess = np.zeros((2, 2))
    for a in range(2):
        for b in range(2):
            ea, eb = np.eye(2)[a] * h, np.eye(2)[b] * h
            hess[a, b] = (f(v0 + ea + eb) - f(v0 + ea - eb) - f(v0 - ea + eb) + f(v0 - ea - eb)) / (4 * h * h)
    return -hess


def test_louis_on_the_joint_matches_the_exact_hessian():
    """At the MLE, with the exact joint posterior as proposal: six independent runs of K = 1000 draws;
    their mean information is within 4 standard errors (their spread / sqrt 6) of the finite-difference
    Hessian of the exact Gaussian marginal (measured: 72.13 +- 0.77, 2.12 +- 0.09, 18.01 +- 0.13
    against 72.20, 1.92, 17.97), and standard errors follow by the delta method."""
    x = groups()
    tau, sigma = mle(x)
    set_params(tau, sigma)
    guide = exact_posterior_guide(x, tau, sigma)
    reference = finite_difference_information(x, tau, sigma)
    runs = []
    for seed in range(6):
        info = observed_information(hierarchical, x, guide, method="louis", num_samples=1000, seed=seed)
        assert info.parameters.names == ["sigma", "tau"] and info.scores is None
        runs.append(info.matrix.numpy())
    runs = np.array(runs)
    mean, se = runs.mean(0), runs.std(0, ddof=1) / math.sqrt(len(runs))
    assert (np.abs(mean - reference) < 4 * se + 1e-9).all(), (mean, se, reference)
    # the last run's standard errors: se ~ I^(-1/2), so 4 of one run's standard deviations of I
    # (relative to I) move them by at most half that, relative
    errors = info.standard_errors()
    covariance = np.linalg.inv(reference)
    exact_se = {"sigma": sigma * math.sqrt(covariance[0, 0]), "tau": tau * math.sqrt(covariance[1, 1])}
    spread = runs.std(0, ddof=1).diagonal() / reference.diagonal()
    for (name, value), rel in zip(exact_se.items(), spread, strict=True):
        assert float(errors[name]) == pytest.approx(value, rel=2 * rel), name


# ----- a shared discrete latent -----------------------------------------------------------------

def shared_switch(x):
    """One a in {0, 1} (p = 1/2) for the whole data set; x_i ~ N(loc_a, 1)."""
    locs = pyro.param("locs", torch.tensor([1.0, 10.0], dtype=x.dtype))
    a = pyro.sample("a", dist.Categorical(torch.tensor([0.5, 0.5], dtype=x.dtype)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(locs[a], 1.0), obs=x)


def switch_data():
    g = torch.Generator().manual_seed(2)
    return torch.cat([torch.randn(50, generator=g, dtype=torch.float64),
                      5 + torch.randn(50, generator=g, dtype=torch.float64)])


def switch_loglik(x, locs) -> float:
    return special.logsumexp([math.log(0.5) + stats.norm(loc, 1).logpdf(x.numpy()).sum() for loc in locs])


def test_a_shared_discrete_latent_is_summed_out_of_the_joint():
    x = switch_data()
    ll = freqvi.log_likelihood(shared_switch, data=x)
    assert ll.method == "exact" and ll.joint and ll.per_observation is None
    assert ll.total == pytest.approx(switch_loglik(x, (1.0, 10.0)), rel=1e-12)


def test_observed_information_of_a_shared_discrete_latent():
    """At locs = (mean x, mean x) the joint log-likelihood is log N(x; mean, 1) + const and its
    information is diag(n / 2, n / 2): each loc carries half the posterior weight."""
    x = switch_data()
    pyro.param("locs", x.mean().repeat(2))
    info = observed_information(shared_switch, x)
    assert info.method == "exact" and info.scores is None
    np.testing.assert_allclose(info.matrix.numpy(), np.diag([50.0, 50.0]), atol=1e-8)
    with pytest.raises(FreqviInputError, match="sandwich"):
        info.covariance("sandwich")


def test_a_shared_discrete_latent_by_importance_sampling():
    """A guide over a: each draw's weight takes one of two values, so k-hat cannot be estimated
    (tied weights), which the result and the warning say; the estimate is within 4 standard errors."""
    x = switch_data()

    def guide(x):
        pyro.sample("a", dist.Categorical(torch.tensor([0.7, 0.3], dtype=x.dtype)))

    with pytest.warns(UnestimableParetoKWarning, match="tied"):
        ll = freqvi.log_likelihood(shared_switch, guide=guide, data=x, method="importance", num_samples=400,
                                   seed=0)
    assert ll.joint and np.isnan(ll.pareto_k).all() and ll.num_heavy_tailed == 0
    assert "cannot be estimated" in ll.pareto_k_note
    assert abs(ll.total - switch_loglik(x, (1.0, 10.0))) < 4 * ll.standard_error


# ----- crossed random effects -------------------------------------------------------------------

SCHOOLS, RATERS = 4, 3


def crossed(y, school, rater):
    """y_i = m + a_school(i) + b_rater(i) + e_i: school and rater effects both latent, each in its own
    plate, so every observation is coupled to others through both."""
    m = pyro.param("m", torch.tensor(0.0, dtype=y.dtype))
    with pyro.plate("schools", SCHOOLS):
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.2))
    with pyro.plate("raters", RATERS):
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 0.7))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(m + a[..., school] + b[..., rater], 0.5), obs=y)


def crossed_data():
    rng = np.random.default_rng(7)
    school, rater = np.repeat(np.arange(SCHOOLS), 6), np.tile(np.arange(RATERS), 8)
    y = 1.0 + 1.2 * rng.standard_normal(SCHOOLS)[school] + 0.7 * rng.standard_normal(RATERS)[rater]
    y += 0.5 * rng.standard_normal(len(y))
    return torch.tensor(y), torch.tensor(school), torch.tensor(rater)


def crossed_design(school, rater):
    return np.hstack([np.eye(SCHOOLS)[school.numpy()], np.eye(RATERS)[rater.numpy()]])


def test_crossed_random_effects_by_the_joint_weight():
    """y ~ N(m 1, Z D Z^T + 0.25 I), Z the school and rater indicators, D = diag(1.44.., 0.49..); the
    exact posterior of (a, b) is Gaussian: as an AutoMultivariateNormal it gives the exact total."""
    y, school, rater = crossed_data()
    pyro.param("m", torch.tensor(0.9, dtype=torch.float64))
    z = crossed_design(school, rater)
    prior = np.diag([1.2**2] * SCHOOLS + [0.7**2] * RATERS)
    exact = stats.multivariate_normal(np.full(len(y), 0.9), z @ prior @ z.T + 0.25 * np.eye(len(y)))
    precision = np.linalg.inv(prior) + z.T @ z / 0.25
    covariance = np.linalg.inv(precision)
    mean = covariance @ z.T @ (y.numpy() - 0.9) / 0.25
    guide = autoguide.AutoMultivariateNormal(crossed)
    with poutine.block():
        guide(y, school, rater)
    tril = torch.linalg.cholesky(torch.tensor(covariance))
    guide.loc = torch.nn.Parameter(torch.tensor(mean))
    guide.scale = tril.diagonal().clone()
    guide.scale_tril = tril / tril.diagonal().unsqueeze(-1)
    ll = freqvi.log_likelihood(crossed, guide=guide, data=(y, school, rater), num_samples=30, seed=0,
                               proposal="guide")
    assert ll.joint and ll.per_observation is None
    assert ll.total == pytest.approx(exact.logpdf(y.numpy()), abs=1e-8)


def test_maximize_likelihood_of_a_shared_discrete_latent():
    """The joint total is what L-BFGS climbs: it reaches scipy's maximum of the log-sum-exp."""
    from freqvi.infer.maximize_likelihood import maximize_likelihood

    x = switch_data()
    result = maximize_likelihood(shared_switch, x)
    best = optimize.minimize(lambda v: -switch_loglik(x, v), [1.0, 10.0], method="Nelder-Mead",
                             options={"xatol": 1e-10, "fatol": 1e-12})
    assert result.converged and result.log_likelihood == pytest.approx(-best.fun, abs=1e-8)


def test_the_result_says_that_only_the_total_exists():
    x = switch_data()
    text = str(freqvi.log_likelihood(shared_switch, data=x))
    assert text.startswith("log-likelihood -524.") and "exact" in text and "do not exist" in text

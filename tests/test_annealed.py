"""annealed_log_likelihood against quadrature and closed forms; its weights unbiased in probability."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from scipy import stats
from test_proposals import (
    MU,
    SIGMA,
    counts,
    discrete_guide,
    exact_posterior,
    gamma_poisson,
    gauss_hermite_log_marginal,
    laplace_guide,
    mixed_model,
    poisson_lognormal,
    random_effects,
)

from freqvi.errors import FreqviInputError
from freqvi.infer.annealed import annealed_log_likelihood, bidirectional_log_likelihood


def prior_guide(x):
    """The prior as proposal: far from each count's posterior."""
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(torch.full_like(x, MU), SIGMA))


def exact_gamma_posterior(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Gamma(3.0 + x, torch.full_like(x, 2.5)))


def wide_log_normal_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.LogNormal(torch.log(1.0 + x), torch.full_like(x, 1.0)))


@pytest.mark.parametrize("model, guide, exact", [
    (random_effects, exact_posterior, lambda x: stats.norm(0.5, math.sqrt(2.0)).logpdf(x)),
    (gamma_poisson, exact_gamma_posterior, lambda x: stats.nbinom(3, 1.5 / 2.5).logpmf(x)),
], ids=["normal", "gamma"])
def test_from_the_exact_posterior_every_weight_is_the_likelihood(model, guide, exact):
    """q = p(z | x): every intermediate target is the posterior and log w = log p(x) on every path."""
    x = counts(15)
    result = annealed_log_likelihood(model, x, guide, num_temperatures=10, num_chains=4, seed=0)
    np.testing.assert_allclose(result.per_observation.numpy(), exact(x.numpy()), atol=1e-9)
    assert result.standard_error < 1e-9 and (result.effective_sample_size > 4 - 1e-9).all()


def test_from_the_prior_it_agrees_with_quadrature():
    x = counts(100)
    result = annealed_log_likelihood(poisson_lognormal, x, prior_guide, num_temperatures=50, seed=0)
    exact = gauss_hermite_log_marginal(x.numpy()).sum()
    assert 0 < result.standard_error < 1 and abs(result.total - exact) < 4 * result.standard_error
    assert 0.5 < result.acceptance_rate <= 1


def test_a_positive_latent_moves_on_the_unconstrained_space():
    x = counts(60)
    result = annealed_log_likelihood(gamma_poisson, x, wide_log_normal_guide, num_temperatures=50, seed=1)
    exact = stats.nbinom(3, 1.5 / 2.5).logpmf(x.numpy()).sum()
    assert 0 < result.standard_error < 1 and abs(result.total - exact) < 4 * result.standard_error


def test_its_likelihood_estimates_are_unbiased():
    """E[p_hat(x_i) / p(x_i)] = 1: the mean over 300 counts within 4 standard errors."""
    x = counts(300)
    result = annealed_log_likelihood(poisson_lognormal, x, prior_guide, num_temperatures=10, num_chains=2,
                                     seed=2)
    ratio = np.exp(result.per_observation.numpy() - gauss_hermite_log_marginal(x.numpy()))
    assert ratio.std() > 1e-3 and abs(ratio.mean() - 1) < 4 * ratio.std() / math.sqrt(len(x))


@pytest.mark.parametrize("model, guide, message", [
    (random_effects, AutoNormal(random_effects), "auxiliary draw or a point mass"),
    (mixed_model, discrete_guide, "site 'k' is discrete"),
])
def test_what_it_cannot_anneal_is_refused(model, guide, message):
    with pytest.raises(FreqviInputError, match=message):
        annealed_log_likelihood(model, counts(10).double(), guide)


@pytest.mark.parametrize("option, message", [
    ({"step_size": 0.0}, "step_size must be a finite number > 0"),
    ({"step_size": float("nan")}, "step_size"),
    ({"step_size": True}, "step_size"),
    ({"num_temperatures": 0}, "num_temperatures"),
    ({"seed": -1}, "seed"),  # a raw NumPy error before: the check every other driver uses
])
def test_bad_settings_are_refused(option, message):
    with pytest.raises(FreqviInputError, match=message):
        annealed_log_likelihood(poisson_lognormal, counts(10), prior_guide, **option)


def test_bidirectional_bounds_bracket_the_exact_value_on_simulated_data():
    """Counts drawn with their latents: forward AIS below, reverse AIS above Gauss-Hermite, each within
    4 standard errors, and the gap small."""
    g = torch.Generator().manual_seed(5)
    z = MU + SIGMA * torch.randn(100, generator=g, dtype=torch.float64)
    x = torch.poisson(z.exp(), generator=g)
    exact = gauss_hermite_log_marginal(x.numpy()).sum()
    bounds = bidirectional_log_likelihood(poisson_lognormal, x, laplace_guide, {"z": z}, num_temperatures=50,
                                          seed=0)
    lower, upper = bounds.lower, bounds.upper
    assert lower.total < exact + 4 * lower.standard_error and upper.total > exact - 4 * upper.standard_error
    assert 0 < upper.standard_error < 0.1 and 0 < bounds.gap < 0.5  # measured: 0.13 nats over 100 counts


def test_bidirectional_needs_every_latent():
    with pytest.raises(FreqviInputError, match=r"latents must give a value for each .*\['z'\]; got \['u'\]"):
        bidirectional_log_likelihood(poisson_lognormal, counts(10), prior_guide, {"u": torch.zeros(10)})


"""annealed_log_likelihood against quadrature and closed forms; its weights unbiased in probability."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from scipy import special, stats
from test_proposals import (
    DEFAULT_NAME,
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

import freqvi
from freqvi.errors import FreqviInputError, ImportanceSamplingWarning
from freqvi.guides import LocalMeanField
from freqvi.infer.annealed import AnnealedLogLikelihood, annealed_log_likelihood, bidirectional_log_likelihood


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


def shared_mean(x):
    """m ~ N(0, 1) shared by every row (outside the data plate), z_i ~ N(m, 1), x_i ~ N(z_i, 1)."""
    m = pyro.sample("m", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(m, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x[i])


def shared_mean_guide(x):
    pyro.sample("m", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(x / 2, 0.7))


def method_ais(model, x, guide, **options):
    return freqvi.log_likelihood(model, x, guide, method="ais", **options)


@pytest.mark.parametrize("route", [annealed_log_likelihood, method_ais], ids=["function", "method"])
@pytest.mark.parametrize("model, guide, message", [
    (random_effects, lambda: AutoNormal(random_effects), "site 'z_unconstrained' is an auxiliary draw"),
    (mixed_model, lambda: discrete_guide, "site 'k' is discrete"),
    (shared_mean, lambda: shared_mean_guide, r"site\(s\) \['m'\] lie outside the data plate 'data'"),
    (random_effects, lambda: None, "(starts its chains at draws of the guide|needs a guide)"),
], ids=["autoguide", "discrete", "global", "no guide"])
def test_what_it_cannot_anneal_is_refused(route, model, guide, message):
    """Before any transition: the refusals of AIS through either entry point."""
    with pytest.raises(FreqviInputError, match=message):
        route(model, counts(10).double(), guide())


def test_method_ais_routes_to_annealed_importance_sampling():
    """log_likelihood(method="ais") is annealed_log_likelihood: the same draws give the same numbers, and
    its options reach the chains."""
    x = counts(40)
    options = dict(num_temperatures=12, num_chains=5, leapfrog_steps=3, step_size=0.2, seed=3)
    direct = annealed_log_likelihood(poisson_lognormal, x, laplace_guide, **options)
    routed = freqvi.log_likelihood(poisson_lognormal, x, laplace_guide, method="ais", **options)
    assert isinstance(routed, AnnealedLogLikelihood) and isinstance(routed, freqvi.LogLikelihood)
    torch.testing.assert_close(routed.per_observation, direct.per_observation, rtol=0, atol=0)
    assert routed.standard_error == direct.standard_error and routed.acceptance_rate == direct.acceptance_rate
    settings = routed.settings
    assert (settings.num_temperatures, settings.num_chains, settings.leapfrog_steps, settings.step_size) == \
        (12, 5, 3, 0.2)
    assert routed.method == "ais" and routed.num_samples == routed.num_chains == 5
    assert settings.evaluations_per_observation == 12 * 5 * 4
    fewer = method_ais(poisson_lognormal, x, laplace_guide, **{**options, "seed": 4, "num_temperatures": 6})
    assert fewer.settings.num_temperatures == 6
    assert not torch.equal(fewer.per_observation, routed.per_observation)


def test_its_result_reads_like_the_importance_result():
    """Per-observation estimates, their standard errors (which sum in quadrature to the total's), effective
    sample sizes between 1 and K, the acceptance rate and the CPU time, as importance sampling's result."""
    x = counts(30)
    ais = method_ais(poisson_lognormal, x, laplace_guide, num_temperatures=20, seed=0)
    importance = freqvi.log_likelihood(poisson_lognormal, x, laplace_guide, num_samples=200, seed=0)
    for result, k in ((ais, 16), (importance, 200)):
        assert result.per_observation.shape == result.per_observation_se.shape == (30,)
        assert result.effective_sample_size.shape == (30,)
        assert ((result.effective_sample_size >= 1 - 1e-9) & (result.effective_sample_size <= k + 1e-9)).all()
        assert result.standard_error == pytest.approx(float(result.per_observation_se.square().sum().sqrt()))
        assert result.total == pytest.approx(float(result.per_observation.sum()))
        assert result.cpu_seconds_per_observation > 0 and result.num_samples == k
    assert 0 < ais.acceptance_rate <= 1 and ais.pareto_k is None and ais.proposal == "guide"
    assert "annealed importance sampling" in repr(ais) and "20 temperatures x 16 chains" in repr(ais)
    assert freqvi.log_likelihood(poisson_lognormal, x, laplace_guide, seed=0).num_samples == 1000  # default


@pytest.mark.parametrize("options, message", [
    ({"method": "ais", "num_samples": 100}, r"num_samples: option\(s\) of importance sampling.*num_chains"),
    ({"method": "ais", "proposal": "student_t"}, "proposal: option"),
    ({"method": "ais", "chunk_size": 10}, "chunk_size: option"),
    ({"num_chains": 8}, r"num_chains: option\(s\) of annealed importance sampling, but method='auto'"),
    ({"method": "importance", "num_temperatures": 10, "leapfrog_steps": 2},
     "leapfrog_steps, num_temperatures: option"),
    ({"method": "ais", "num_temperatures": 0}, "num_temperatures"),
    ({"method": "ais", "step_size": -0.1}, "step_size"),
])
def test_an_option_of_another_method_is_refused(options, message):
    """Not silently ignored: a num_chains with importance sampling would do nothing the caller meant."""
    with pytest.raises(FreqviInputError, match=message):
        freqvi.log_likelihood(poisson_lognormal, counts(10), laplace_guide, **options)


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



def mean_field_optimum(loc, precision):
    """The mean-field Gaussian closest to the posterior N(loc, P^-1) in KL(q || p): the exact means,
    variances 1 / P_jj (narrower than the posterior's where the factors correlate)."""
    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("factors", dist.Normal(loc, precision.diagonal().rsqrt()).to_event(1))
    return guide


def factor_prior(loc, precision):
    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("factors", dist.Normal(torch.zeros_like(loc), 1.0).to_event(1))
    return guide


@pytest.mark.parametrize("make_guide", [mean_field_optimum, factor_prior])
def test_factor_analysis_per_observation_agrees_with_the_exact_marginal(factor_analysis_at_mle, make_guide):
    """The issue's acceptance on factor analysis, at the default settings (100 temperatures, 16 chains):

    * each log p_hat(x_i) within 3 of its standard errors of the exact value, save as many as chance
      allows: with the standard error estimated from K = 16 chains, z_i is about t_15, outside 3 for a
      share 2 P(t_15 > 3) = 0.9%; the count outside may not exceed Binomial(200, 0.9%)'s 99.9% quantile
      (7; measured: 1 and 3);
    * the total within 3 standard errors;
    * unbiased in the probability sense: the mean over rows of p_hat(x_i) / p(x_i) is 1 within 3 of
      its standard errors (measured -1.05 and +0.80 of them).
    """
    fa, x, exact, loc, covariance = factor_analysis_at_mle
    precision = torch.linalg.inv(covariance)
    ais = freqvi.log_likelihood(fa.model, x, make_guide(loc, precision), method="ais", seed=0)
    k = ais.num_chains
    z = (ais.per_observation.numpy() - exact) / ais.per_observation_se.numpy()
    allowed = stats.binom(len(x), 2 * stats.t(k - 1).sf(3.0)).ppf(0.999)
    assert (np.abs(z) > 3).sum() <= allowed
    assert abs(ais.total - exact.sum()) < 3 * ais.standard_error
    ratio = np.exp(ais.per_observation.numpy() - exact)
    assert ratio.std() > 1e-5 and abs(ratio.mean() - 1) < 3 * ratio.std(ddof=1) / math.sqrt(len(x))


def readme_counts_fitted():
    """The README's Poisson log-normal: 500 float32 counts, a LocalMeanField guide fitted by variational
    EM as the README fits it; Gauss-Hermite quadrature (200 nodes) at the fitted (mu, sigma)."""
    def model(x):
        mu = pyro.param("mu", torch.tensor(0.0))
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)) as i:
            z = pyro.sample("z", dist.Normal(mu, sigma))
            pyro.sample("obs", dist.Poisson(z.exp()), obs=x[i])

    torch.manual_seed(0)
    x = torch.poisson(torch.exp(1.0 + 0.5 * torch.randn(500)))
    guide = LocalMeanField(model)
    freqvi.fit(model, x, guide, loss="mean_field", num_steps=3000, lr=0.05, seed=0, progress=False)
    mu, sigma = pyro.param("mu").item(), pyro.param("sigma").item()
    nodes, weights = special.roots_hermitenorm(200)
    log_joint = (stats.poisson.logpmf(x.double().numpy()[:, None], np.exp(mu + sigma * nodes))
                 + np.log(weights / math.sqrt(2 * math.pi)))
    return model, x, guide, special.logsumexp(log_joint, 1).sum()


@pytest.mark.slow
def test_readme_poisson_lognormal_every_estimate_within_three_standard_errors():
    """The issue's acceptance: AIS (default settings) and each importance proposal (K = 1000) within 3
    standard errors of quadrature (measured: guide -0.96, Student-t +0.13, mixture +0.29, adaptive Student-t
    -1.07, AIS -1.19)."""
    model, x, guide, exact = readme_counts_fitted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)  # the guide's 57 flagged counts
        estimates = [freqvi.log_likelihood(model, x, guide, num_samples=1000, seed=1, proposal=proposal)
                     for proposal in ("guide", "student_t", "mixture", "adaptive")]
    estimates.append(freqvi.log_likelihood(model, x, guide, method="ais", seed=1))
    for estimate in estimates:
        assert 0 < estimate.standard_error < 1
        assert abs(estimate.total - exact) < 3 * estimate.standard_error, estimate


@pytest.fixture(scope="module")
def digits_vae():
    """The tour's VAE (latent 8), trained as the tour trains it, from torch's seed 0 (about 9 CPU s)."""
    from freqvi.datasets import load_digits
    from freqvi.models import VAE

    train = (load_digits("train") > 0.5).float()
    torch.manual_seed(0)
    model = VAE(64, latent_dim=8)
    freqvi.fit(model, train[:-200], loss="mean_field", lr=2e-3, num_steps=4000, batch_size=128, seed=0,
               progress=False, validation_data=train[-200:], eval_every=400)
    return model, (load_digits("test") > 0.5).float()


@pytest.mark.slow
def test_digits_vae_ais_agrees_with_the_default_importance_estimate(digits_vae):
    """The issue's acceptance, on the first 100 test images: AIS at its defaults and importance sampling
    with the default proposal (K = 1000) within 0.1 nats per image (benchmarks/ais_temperatures.py
    measures it on every test image), and each within 4 of their joint standard errors of the other
    (measured with the adaptive Student-t: AIS 0.007 nats per image below, -0.74 joint standard errors;
    with the plain Student-t it was 0.015 above, 1.3 joint standard errors)."""
    model, test = digits_vae
    test = test[:100]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)  # k-hat is the benchmark's to report
        importance = freqvi.log_likelihood(model, test, num_samples=1000, seed=1)
    ais = freqvi.log_likelihood(model, test, method="ais", seed=1)
    assert importance.proposal == DEFAULT_NAME and 0.5 < ais.acceptance_rate < 1
    assert abs(ais.total - importance.total) / len(test) < 0.1
    assert abs(ais.total - importance.total) < 4 * math.hypot(ais.standard_error, importance.standard_error)


@pytest.mark.slow
def test_digits_vae_bidirectional_gap_on_simulated_images(digits_vae):
    """Images drawn from the fitted VAE with their latents: at the default settings the bidirectional gap
    is below 0.2 nats per image (the issue's bar) on 30 images, and the bounds are ordered within noise
    (measured: 0.008 nats per image, its standard error 0.018)."""
    model, _ = digits_vae
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        z = torch.randn(30, 8, generator=g)
        x = torch.bernoulli(model.decode(z).mean, generator=g)
    bounds = bidirectional_log_likelihood(model, x, None, {"latent": z}, seed=2)
    noise = math.hypot(bounds.lower.standard_error, bounds.upper.standard_error)
    assert -3 * noise < bounds.gap < 0.2 * len(x)

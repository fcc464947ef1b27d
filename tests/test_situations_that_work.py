"""Situations users have reported against other libraries that freqvi already handled (issue 15 item 6),
kept as tests so they stay handled; each against a closed form or the library's own exact route."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import freqvi
from freqvi.errors import FreqviInputError
from freqvi.estimators import IWAE_ELBO
from freqvi.infer.information import BoundaryWarning
from freqvi.models import VAE, FactorAnalysis, GaussianMixture


def test_three_components_on_two_distinct_points():
    """Ten copies each of 0 and 1: two components sit on the points with variance reg_covar = 1e-6
    and the third adds nothing, so l = 20 (log 1/2 - 1/2 log(2 pi 1e-6))."""
    x = torch.tensor([[0.0], [1.0]] * 10, dtype=torch.float64)
    with pytest.warns(BoundaryWarning, match=r"em ended on the floor"):  # the floor, not an estimate: said
        result = freqvi.em(GaussianMixture(3, 1), x, progress=False, seed=0)
    exact = 20 * (math.log(0.5) - 0.5 * math.log(2 * math.pi * 1e-6))
    assert result.log_likelihood[-1] == pytest.approx(exact, rel=1e-9)


def test_factor_analysis_with_as_many_factors_as_dimensions_is_the_gaussian_mle():
    """latent_dim = dim: W W^T + Psi can be any covariance, so the maximum is the Gaussian MLE's,
    -n/2 (d log 2 pi + log |S| + d) with S the sample covariance (divisor n)."""
    x = freqvi.datasets.load_iris().double()[:, :3]
    n, d = x.shape
    fa = FactorAnalysis(dim=d, latent_dim=d)
    freqvi.em(fa, x, progress=False)
    covariance = torch.cov(x.T, correction=0)
    exact = -n / 2 * (d * math.log(2 * math.pi) + torch.logdet(covariance).item() + d)
    assert freqvi.log_likelihood(fa, x).total == pytest.approx(exact, abs=1e-6)


def test_a_bernoulli_vae_on_raw_intensities_is_refused_with_the_fix():
    pixels = freqvi.datasets.load_digits()[:50] * 16  # 0..16, as the digits come
    with pytest.raises(FreqviInputError, match=r"\[0, 1\].*Rescale"):
        freqvi.fit(VAE(64, 2), pixels, num_steps=2, progress=False)


def test_iwae_with_ten_thousand_draws_from_a_poor_proposal_stays_a_finite_lower_bound():
    """z ~ N(0, 1), x | z ~ N(z, 1), a proposal N(-1, 0.5^2) far from the posterior N(x/2, 1/2):
    L_K is finite and below log p(x) = log N(x; 0, 2) for K up to 10^4, and rises with K."""
    import pyro
    import pyro.distributions as dist

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.full_like(x, -1.0), 0.5))

    x = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum().item()
    pyro.set_rng_seed(0)
    bounds = [-IWAE_ELBO(num_particles=k).loss(model, guide, x) for k in (10, 10_000)]
    assert all(math.isfinite(b) for b in bounds)
    assert bounds[0] < bounds[1] < exact


def test_online_em_over_a_dataloader_with_an_uneven_last_batch_records_the_exact_log_likelihood():
    """150 rows in batches of 40 (the last has 30): the objective em records, summed over a second pass,
    is the exact log-likelihood at the final parameters."""
    x = freqvi.datasets.load_iris().double()
    loader = DataLoader(TensorDataset(x), batch_size=40, shuffle=False)
    gm = GaussianMixture(2, 4)
    with pytest.warns(freqvi.errors.ConvergenceWarning):  # three passes of online EM are not converged
        result = freqvi.em(gm, loader, max_iter=3, progress=False, seed=0)
    assert result.log_likelihood[-1] == pytest.approx(freqvi.log_likelihood(gm, x).total, rel=1e-10)

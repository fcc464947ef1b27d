"""Flat directions of a user-written pair's information are found as for the built-in models.

Issue 14 item 9: probabilistic PCA written by hand (parameters W, mu, sigma2), with its
exact posterior as the guide, through Louis's identity. With q = 2 factors the
loadings are identified only up to a rotation, so they get no standard error; with
q = 1 nothing is flat. The reference is the built-in FactorAnalysis's exact
information (the autograd Hessian of the Gaussian marginal) at the same parameters,
the Tipping-Bishop maximum-likelihood estimate.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

import freqvi
from freqvi.infer.information import IdentifiabilityWarning
from freqvi.models import FactorAnalysis


def tipping_bishop(x: torch.Tensor, q: int) -> dict[str, torch.Tensor]:
    """PPCA's MLE: mu = mean, sigma2 = mean discarded eigenvalue, W = U_q (L_q - sigma2)^{1/2}."""
    values, vectors = torch.linalg.eigh(torch.cov(x.T, correction=0))
    values, vectors = values.flip(0), vectors.flip(1)
    sigma2 = values[q:].mean()
    return {"mu": x.mean(0), "W": vectors[:, :q] * (values[:q] - sigma2).sqrt(), "sigma2": sigma2}


def user_ppca(mle: dict[str, torch.Tensor]):
    """The pair as a Pyro user writes it: pyro.param sites and the exact Gaussian posterior."""
    q = mle["W"].shape[1]

    def model(x):
        w, mu = pyro.param("W", mle["W"].clone()), pyro.param("mu", mle["mu"].clone())
        v = pyro.param("sigma2", mle["sigma2"].clone(), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(q), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(mu + z @ w.T, v.sqrt()).to_event(1), obs=x)

    def guide(x):
        w, mu, v = (pyro.param(name).detach() for name in ("W", "mu", "sigma2"))
        cov = torch.linalg.inv(torch.eye(q, dtype=x.dtype) + w.T @ w / v)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal((x - mu) @ w @ cov / v, covariance_matrix=cov))

    return model, guide


def fitted(q: int):
    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.normal(size=(100, q)) @ rng.normal(size=(q, 3)) + 0.5 * rng.normal(size=(100, 3)))
    mle = tipping_bishop(x, q)
    reference = FactorAnalysis(3, q, "isotropic", init={
        "mean": mle["mu"].numpy(), "loading": mle["W"].numpy(), "noise_variance": mle["sigma2"].numpy()})
    exact = freqvi.observed_information(reference, data=x)
    model, guide = user_ppca(mle)
    model(x)
    return x, model, guide, exact


def test_rotated_loadings_of_a_user_ppca_have_no_standard_error():
    x, model, guide, exact = fitted(q=2)
    with pytest.warns(IdentifiabilityWarning, match=r"\['loading'\] are not identified"):
        reference = exact.standard_errors()
    louis = freqvi.observed_information(model, data=x, guide=guide, method="louis", num_samples=400, seed=0)
    with pytest.warns(IdentifiabilityWarning, match=r"\['W'\] are not identified .*Monte-Carlo error"):
        se = louis.standard_errors()
    assert torch.isnan(se["W"]).all()
    assert louis.num_parameters == exact.num_parameters == 3 + 6 - 1 + 1  # d + dq - q(q-1)/2 + 1
    # Monte-Carlo standard deviation of these ratios over six seeds of this test: at most 0.11
    # (mu) and 0.014 (sigma2) with 400 draws; 4 of them.
    np.testing.assert_allclose(se["mu"], reference["mean"], rtol=0.44)
    np.testing.assert_allclose(se["sigma2"], reference["noise_variance"], rtol=0.06)


def test_a_user_ppca_with_one_factor_has_no_flat_direction():
    """The control: no rotation, so every entry keeps its standard error, and no warning."""
    x, model, guide, exact = fitted(q=1)
    reference = exact.standard_errors()
    louis = freqvi.observed_information(model, data=x, guide=guide, method="louis", num_samples=400, seed=0)
    se = louis.standard_errors()
    assert louis.num_parameters == exact.num_parameters == 3 + 3 + 1
    # Monte-Carlo standard deviation over six seeds: at most 0.014 relative; 4 of them.
    np.testing.assert_allclose(se["W"].abs(), reference["loading"].abs(), rtol=0.06)
    np.testing.assert_allclose(se["mu"], reference["mean"], rtol=0.06)
    np.testing.assert_allclose(se["sigma2"], reference["noise_variance"], rtol=0.06)

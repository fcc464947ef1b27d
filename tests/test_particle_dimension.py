"""The particle dimension (issue 14 item 4): a model that does not broadcast over a leftmost particle
dimension is refused by every vectorising route with the rule; written to the rule, it runs and its
numbers match a closed form."""

import functools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal

import freqvi
from freqvi.errors import ConvergenceWarning, FreqviInputError

GROUPS = 6


def hierarchical_data(n=30, seed=0):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, GROUPS, n)
    return torch.as_tensor(rng.normal(group * 0.5, 1.0)), torch.as_tensor(group)


def model(x, group, broadcast_safe=True):
    """u_g ~ N(mu, 1) per group, x_i ~ N(u_{group_i}, 1)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate("groups", GROUPS):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
    with pyro.plate("data", len(x)) as i:
        loc = u[..., group[i]] if broadcast_safe else u[group[i]]  # u[group] indexes the particles
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x[i])


def exact_guide(x, group, broadcast_safe=True):
    """u_g | x ~ N((mu + s_g) / (1 + n_g), 1 / (1 + n_g)), s_g and n_g the sum and count of group g."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    counts = torch.bincount(group, minlength=GROUPS).to(x.dtype)
    sums = torch.zeros(GROUPS, dtype=x.dtype).index_add(0, group, x)
    with pyro.plate("groups", GROUPS):
        pyro.sample("u", dist.Normal((mu + sums) / (1 + counts), (1 + counts).rsqrt()))


unsafe_model = functools.partial(model, broadcast_safe=False)

ROUTES = {
    "em": lambda m, g, d: freqvi.em(m, guide=g, data=d, max_iter=2, progress=False),
    "iwae": lambda m, g, d: freqvi.fit(m, guide=g, data=d, loss="iwae", num_particles=4, num_steps=2,
                                       progress=False),
    "dreg": lambda m, g, d: freqvi.fit(m, guide=g, data=d, loss="dreg", num_particles=4, num_steps=2,
                                       progress=False),
    "stl": lambda m, g, d: freqvi.fit(m, guide=g, data=d, loss="stl", num_particles=4, num_steps=2,
                                      progress=False),
    "vectorized-trace": lambda m, g, d: freqvi.fit(m, guide=g, data=d, num_particles=4,
                                                   vectorize_particles=True, num_steps=2, progress=False),
    "log_likelihood": lambda m, g, d: freqvi.log_likelihood(m, guide=g, data=d, num_samples=100),
    "louis": lambda m, g, d: freqvi.observed_information(m, guide=g, data=d, method="louis", num_samples=100),
    "elbo_terms": lambda m, g, d: freqvi.elbo_terms(m, guide=g, data=d, num_samples=10),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_model_that_does_not_broadcast_over_particles_is_refused_with_the_rule(route):
    pyro.clear_param_store()
    with pytest.raises(FreqviInputError, match=r"particles at once along a new batch dimension left of every "
                                               r"plate \(dim=-2\).*u\[\.\.\., group\], not u\[group\]"):
        ROUTES[route](unsafe_model, exact_guide, hierarchical_data())
    assert list(pyro.get_param_store().keys()) == []  # the refused call leaves the store as it found it


def test_plain_svi_still_takes_the_unsafe_model():
    """One particle at a time needs no broadcasting: fit's default Trace_ELBO runs it."""
    pyro.clear_param_store()
    result = freqvi.fit(unsafe_model, guide=exact_guide, data=hierarchical_data(), num_steps=3,
                        progress=False)
    assert np.isfinite(result.elbo).all()


def test_the_broadcast_safe_model_runs_in_em_and_its_objective_is_the_exact_likelihood():
    """With the exact posterior as guide, em's objective (16 vectorised particles) is log p(x): for each
    group, x_g ~ N(mu 1, I + 1 1') (scipy)."""
    pyro.clear_param_store()
    x, group = hierarchical_data()
    with pytest.warns(ConvergenceWarning):
        result = freqvi.em(model, guide=exact_guide, data=(x, group), max_iter=3, progress=False)
    mu = pyro.param("mu").item()
    expected = sum(multivariate_normal(np.full(int((group == g).sum()), mu),
                                       np.eye(int((group == g).sum())) + 1.0).logpdf(x[group == g].numpy())
                   for g in range(GROUPS))
    assert result.log_likelihood[-1] == pytest.approx(expected, abs=1e-8)
    assert mu > 0.1  # it moved from 0 toward the data (group means 0 to 2.5)

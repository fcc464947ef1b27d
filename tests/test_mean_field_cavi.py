"""Exact CAVI on categorical mean-field factors (em's E-step for a LocalMeanField on discrete latents),
checked against Pyro's TraceEnum_ELBO: the same ELBO, its gradient zero at CAVI's fixed point, and em's
end point a stationary point of it in theta and the factors together."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO

import freqvi
from freqvi.guides import LocalMeanField
from freqvi.infer.mean_field_cavi import MeanFieldTables

T = 6  # chain length


def hmm_data(n=60, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(2, (n,), generator=g)
    states = [z]
    for _ in range(T - 1):
        z = torch.where(torch.rand(n, generator=g) < 0.85, z, 1 - z)
        states.append(z)
    states = torch.stack(states, -1)
    return (torch.tensor([-1.0, 1.0])[states] + 0.7 * torch.randn(states.shape, generator=g)).double()


def hmm_model(x):
    """A 2-state chain per row with Gaussian emissions, states sampled one by one (pyro.markov)."""
    init = pyro.param("init", torch.full((2,), 0.5, dtype=x.dtype), constraint=constraints.simplex)
    trans = pyro.param("trans", torch.tensor([[0.6, 0.4], [0.3, 0.7]], dtype=x.dtype),
                       constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-0.5, 0.4], dtype=x.dtype))
    scale = pyro.param("scale", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]) as i:
        z = None
        for t in pyro.markov(range(x.shape[1])):
            z = pyro.sample(f"z_{t}", dist.Categorical(init if z is None else trans[z]))
            pyro.sample(f"x_{t}", dist.Normal(locs[z], scale), obs=x[i, t])


def elbo(guide, x) -> torch.Tensor:
    """Pyro's exact mean-field ELBO (every factor enumerated), differentiable."""
    return -TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(hmm_model, guide, x)


@pytest.fixture
def guide_and_data():
    pyro.clear_param_store()
    x = hmm_data()
    guide = LocalMeanField(hmm_model)
    guide(x)  # creates the factors
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for logits in guide.categorical_logits():
            logits.copy_(torch.randn(logits.shape, generator=g, dtype=logits.dtype))
    return guide, x


def test_the_tables_give_pyros_elbo_and_the_chain_takes_two_colours(guide_and_data):
    guide, x = guide_and_data
    tables = MeanFieldTables(hmm_model, guide, (x,), 1, guide.categorical_logits())
    assert sorted(map(sorted, tables.colours)) == [[0, 2, 4], [1, 3, 5]]  # alternate time steps
    reference = float(elbo(guide, x).detach())
    assert float(tables.objective(tables.probabilities())) == pytest.approx(reference, rel=1e-12)


def test_cavi_never_decreases_the_elbo_and_stops_where_its_gradient_vanishes(guide_and_data):
    guide, x = guide_and_data
    values = [float(elbo(guide, x).detach())]
    for _ in range(6):
        MeanFieldTables(hmm_model, guide, (x,), 1, guide.categorical_logits()).ascend(1, 0.0)
        values.append(float(elbo(guide, x).detach()))
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(values))
    assert values[-1] > values[0] + 1.0
    sweeps = MeanFieldTables(hmm_model, guide, (x,), 1, guide.categorical_logits()).ascend(500, 1e-10)
    assert sweeps < 500
    logits = guide.categorical_logits()
    grads = torch.autograd.grad(elbo(guide, x), logits)  # by Pyro's estimator, not the tables
    assert max(float(g.abs().max()) for g in grads) < 1e-8


def test_em_with_cavi_stops_at_a_stationary_point_of_the_elbo_in_theta_and_the_factors():
    pyro.clear_param_store()
    x = hmm_data()
    guide = LocalMeanField(hmm_model)
    result = freqvi.em(hmm_model, x, guide, m_step="gradient", progress=False, seed=0)
    assert result.converged and result.stop_reason == "tolerance"
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(result.log_likelihood))
    theta = [pyro.param(name).unconstrained() for name in ("init", "trans", "locs", "scale")]
    grads = torch.autograd.grad(elbo(guide, x), theta + guide.categorical_logits())
    assert max(float(g.abs().max()) for g in grads) < 1e-5 * len(x)  # em's score_tol, per observation
    assert result.log_likelihood[-1] == pytest.approx(float(elbo(guide, x).detach()), rel=1e-12)

"""Numerical faults: a non-finite step updates nothing; persistent ones stop with a clear error."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import freqvi
from freqvi.errors import FreqviError


def out_of_support_model(x):
    """Uniform(loc - 1, loc + 1) observations: any x farther than 1 from loc has density 0."""
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Uniform(loc - 1, loc + 1), obs=x)


def no_latents(x):
    pass


def test_persistent_non_finite_loss_stops_with_the_last_good_parameters():
    x = torch.tensor([0.5, -0.2, 0.3])
    result = freqvi.fit(out_of_support_model, no_latents, x, num_steps=20, lr=0.5, progress=False)
    assert result.refused_steps == 0
    good = float(pyro.param("loc").detach())
    with pytest.raises(FreqviError, match=r"step \d+: the Trace_ELBO loss was inf in 4 draws in a row "
                                          r"\(steps \d+ to \d+\); "
                                          r"the model's site 'obs' has a non-finite log-density"):
        freqvi.fit(out_of_support_model, no_latents, torch.tensor([0.5, 5.0]), num_steps=20, progress=False)
    assert float(pyro.param("loc").detach()) == good


def truncated_model(x):
    """z_i ~ N(0, 1) cut at 2 (density 0 beyond), x_i ~ N(z_i, 1)."""
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.factor("cut", torch.where(z > 2.0, -math.inf, 0.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)


def normal_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.5 * x, 0.8))


def test_occasional_non_finite_draws_are_refused_and_the_fit_goes_on():
    x = torch.linspace(-1.0, 1.5, 20)
    result = freqvi.fit(truncated_model, normal_guide, x, num_steps=200, lr=0.05, seed=0, progress=False)
    assert result.refused_steps > 0  # some of the 200 draws cross the cut for some observation
    assert len(result.elbo) == 200 - result.refused_steps
    assert all(math.isfinite(v) for v in result.elbo)
    assert math.isfinite(float(pyro.param("loc").detach()))


def test_gradient_clipping_bounds_each_update():
    x = torch.full((50,), 100.0)

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    freqvi.fit(model, no_latents, x, num_steps=1, optim="sgd", lr=1.0, clip_norm=0.5, progress=False)
    assert float(pyro.param("loc").detach()) == pytest.approx(0.5)

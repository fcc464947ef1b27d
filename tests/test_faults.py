"""Numerical faults: a non-finite step updates nothing; persistent ones stop with a clear error."""

import copy
import math
import re

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from simulate import factor_data, mixture_data

import freqvi
from freqvi.errors import FreqviError
from freqvi.models import VAE, FactorAnalysis, GaussianMixture


def out_of_support_model(x):
    """Uniform(loc - 1, loc + 1) observations: any x farther than 1 from loc has density 0."""
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Uniform(loc - 1, loc + 1), obs=x)


def no_latents(x):
    pass


def test_persistent_non_finite_loss_stops_with_the_last_good_parameters():
    x = torch.tensor([0.5, -0.2, 0.3])
    result = freqvi.fit(out_of_support_model, x, no_latents, num_steps=20, lr=0.5, progress=False)
    assert result.refused_steps == 0
    good = float(pyro.param("loc").detach())
    with pytest.raises(FreqviError, match=r"step \d+: the Trace_ELBO loss was inf in 4 draws in a row "
                                          r"\(steps \d+ to \d+\); "
                                          r"the model's site 'obs' has a non-finite log-density"):
        freqvi.fit(out_of_support_model, torch.tensor([0.5, 5.0]), no_latents, num_steps=20, progress=False)
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
    result = freqvi.fit(truncated_model, x, normal_guide, num_steps=200, lr=0.05, seed=0, progress=False)
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

    freqvi.fit(model, x, no_latents, num_steps=1, optim="sgd", lr=1.0, clip_norm=0.5, progress=False)
    assert float(pyro.param("loc").detach()) == pytest.approx(0.5)


def spread_model(x):
    """x_i ~ N(loc, scale^2), scale > 0: an update of 1e6 on log(scale) makes scale = e^(1e6) = inf."""
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=x)


def test_an_update_that_leaves_a_parameter_infinite_is_refused_and_undone():
    x = torch.tensor([-3.0, 0.5, 4.0])  # spread wider than scale = 1: the gradient raises the scale
    pyro.param("loc", torch.tensor(0.0))
    pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    store = pyro.get_param_store()
    tensors = [store.get_param(n).unconstrained() for n in ("loc", "scale")]
    optimizer = torch.optim.Adam(tensors, lr=1e6)
    with pytest.raises(FreqviError, match=r"^step 0 diverged: the parameters \['scale'\] were not finite "
                                          r"after its update in 4 draws in a row \(steps 0 to 3\)"):
        freqvi.fit(spread_model, guide=no_latents, data=x, optim=optimizer, num_steps=10, progress=False)
    assert pyro.param("loc").item() == 0.0 and pyro.param("scale").item() == 1.0  # as set above
    assert len(optimizer.state) == 0  # Adam's moments and step count as before the first update


def correlation_model(x):
    """Bivariate normal with unit variances and correlation r: r outside (-1, 1) has no Cholesky factor."""
    r = pyro.param("r", torch.tensor(0.0))
    covariance = torch.eye(2) + r * (1 - torch.eye(2))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(2), covariance), obs=x)


def test_an_update_after_which_the_loss_cannot_be_computed_is_undone():
    x = torch.tensor([[1.0, 0.9], [-1.0, -1.1], [0.5, 0.4]])  # positively correlated: r grows
    with pytest.raises(FreqviError, match=r"^step 0 diverged: after its update the Trace_ELBO loss could "
                                          r"not be computed \(LinAlgError: .*\) in 4 draws in a row "
                                          r"\(steps 1 to 4\), while at the parameters before it the loss "
                                          r"is finite"):
        freqvi.fit(correlation_model, guide=no_latents, data=x, lr=1e6, num_steps=10, progress=False)
    assert pyro.param("r").item() == 0.0  # its initial value: r = +-1e6 after Adam's first step was undone


def test_a_run_whose_every_step_was_refused_is_an_error():
    x = torch.tensor([0.5, 5.0])  # 5.0 lies outside Uniform(-1, 1) at loc = 0: every loss is inf
    with pytest.raises(FreqviError, match=r"none of the 3 steps was accepted \(the last was refused as its "
                                          r"loss was inf\), so nothing was fitted"):
        freqvi.fit(out_of_support_model, guide=no_latents, data=x, num_steps=3, progress=False)
    assert pyro.param("loc").item() == 0.0


def test_a_refused_update_puts_back_the_parameters_and_the_optimiser_state_of_a_run_under_way():
    x = torch.tensor([-3.0, 0.5, 4.0])
    pyro.param("loc", torch.tensor(0.0))
    pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    store = pyro.get_param_store()
    optimizer = torch.optim.Adam([store.get_param(n).unconstrained() for n in ("loc", "scale")], lr=0.01)
    freqvi.fit(spread_model, guide=no_latents, data=x, optim=optimizer, num_steps=5, progress=False)
    params = {n: store.get_param(n).detach().clone() for n in ("loc", "scale")}
    state = copy.deepcopy(optimizer.state_dict()["state"])
    optimizer.param_groups[0]["lr"] = 1e6
    with pytest.raises(FreqviError, match=r"^step 0 diverged: the parameters \['scale'\]"):
        freqvi.fit(spread_model, guide=no_latents, data=x, optim=optimizer, num_steps=10, progress=False)
    for name, value in params.items():
        assert torch.equal(store.get_param(name).detach(), value), name
    after = optimizer.state_dict()["state"]
    for index, entries in state.items():
        for key, value in entries.items():
            assert torch.equal(after[index][key], value), (index, key)


def test_a_pyro_optimiser_made_by_a_refused_update_is_dropped():
    x = torch.tensor([-3.0, 0.5, 4.0])
    optimizer = pyro.optim.Adam({"lr": 1e6})
    with pytest.raises(FreqviError, match=r"^step 0 diverged: the parameters \['scale'\]"):
        freqvi.fit(spread_model, guide=no_latents, data=x, optim=optimizer, num_steps=10, progress=False)
    assert pyro.param("loc").item() == 0.0 and pyro.param("scale").item() == 1.0
    assert optimizer.get_state() == {}


@pytest.mark.parametrize("make", [
    lambda: (FactorAnalysis(5, 2), factor_data(n=100)),
    lambda: (GaussianMixture(3, 2), mixture_data(n=100)),
    lambda: (VAE(5, 2, hidden=(8,)), (factor_data(n=100) > 0).double()),
], ids=["factor_analysis", "mixture", "vae"])
def test_a_built_in_model_fitted_with_lr_1e6_stops_saying_the_step_diverged_with_its_start_in_place(make):
    model, x = make()
    model.model(x)  # creates the parameters, at their initial values
    start = {name: value.detach().clone() for name, value in model.estimates().items()}
    with pytest.raises(FreqviError, match=r"^step 0 diverged"):
        freqvi.fit(model, guide=None, data=x, lr=1e6, num_steps=20, seed=0, progress=False)
    for name, value in model.estimates().items():
        assert torch.equal(value, start[name]), name


def location_model(x):
    """x_i ~ N(loc, 1): every loc has a finite loss, 1e6 away a loss of about n * 1e12 / 2."""
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)


def test_an_update_that_sends_a_finite_loss_up_by_orders_of_magnitude_is_undone():
    x = torch.tensor([-3.0, 0.5, 4.0])
    at_start = -scipy.stats.norm.logpdf(x.numpy()).sum()  # the loss at loc = 0: 15.38
    at_1e6 = -scipy.stats.norm.logpdf(x.numpy(), loc=1e6).sum()  # Adam's first step at lr=1e6: 1.5e12
    expected = (f"step 0 diverged: after its update the Trace_ELBO loss rose from {at_start:.4g} to "
                f"{at_1e6:.4g} (step 1), more than 1e+06 times its size. The parameters are those before "
                "step 0")
    with pytest.raises(FreqviError, match="^" + re.escape(expected)):
        freqvi.fit(location_model, guide=no_latents, data=x, lr=1e6, num_steps=10, progress=False)
    assert pyro.param("loc").item() == 0.0


def test_each_parameter_is_checked_under_its_own_constraint_whatever_the_order_of_names():
    """fit hands GuardedStep names sorted without instance numbers ("Net.scale" < "NetGuide.loc") and
    tensors sorted with them ("NetGuide_0.loc" < "Net_0.scale"): checked by name, the guide's loc of
    1000 would go through the scale's exp and overflow."""
    def model(x):
        scale = pyro.param("Net_0.scale", torch.ones(2), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(1000.0, 1.0).expand([2]).to_event(1))
            pyro.sample("obs", dist.Normal(z, scale).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("NetGuide_0.loc", torch.full((len(x), 2), 1000.0))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    x = 1000.0 + torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    result = freqvi.fit(model, guide=guide, data=x, num_steps=5, seed=0, progress=False)
    assert result.refused_steps == 0 and result.num_steps == 5


def steep_model(x):
    """A loss of -1e25 * sum(loc): finite, with a gradient of -1e25 per element, whose squares (and so
    the gradients' 2-norm, and Adam's second moment) overflow float32."""
    loc = pyro.param("loc", torch.zeros(4))
    with pyro.plate("data", len(x)):
        pyro.factor("steep", 1e25 * loc.sum() * torch.ones(len(x)))


def test_finite_gradients_whose_norm_overflows_are_not_refused():
    x = torch.zeros(1)
    result = freqvi.fit(steep_model, guide=no_latents, data=x, optim="sgd", lr=1e-26, num_steps=1,
                        progress=False)
    assert result.refused_steps == 0
    assert pyro.param("loc").detach() == pytest.approx(torch.full((4,), 0.1))  # 0 + 1e-26 * 1e25


def test_an_update_that_leaves_the_optimiser_state_infinite_is_refused_and_undone():
    x = torch.zeros(1)
    pyro.param("loc", torch.zeros(4))
    optimizer = torch.optim.Adam([pyro.get_param_store().get_param("loc").unconstrained()], lr=0.1)
    with pytest.raises(FreqviError, match=r"^step 0 diverged: the optimiser's state was not finite after its "
                                          r"update in 4 draws in a row \(steps 0 to 3\)"):
        freqvi.fit(steep_model, guide=no_latents, data=x, optim=optimizer, num_steps=10, progress=False)
    assert torch.equal(pyro.param("loc").detach(), torch.zeros(4))
    assert len(optimizer.state) == 0  # Adam's moments and step count as before the first update

"""A diffusion model's denoiser is registered with Pyro wherever that changes something, and only there."""

import pyro
import pyro.primitives
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI

import freqvi
import freqvi.models.diffusion
from freqvi.estimators import TimeSubsampledELBO
from freqvi.handlers import SubsamplePlate
from freqvi.models import GaussianDiffusion

X_T, T = torch.randn(4, 2), torch.full((4,), 3)


def small_model() -> GaussianDiffusion:
    return GaussianDiffusion(2, 10, hidden=(8,))  # two linear layers: four parameters


@pytest.fixture
def param_statements(monkeypatch):
    """The names of the ``pyro.param`` statements made since the fixture began (pyro.module makes one per
    parameter)."""
    names = []
    original = pyro.primitives.param

    def counting(name, *args, **kwargs):
        names.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(pyro.primitives, "param", counting)
    return names


def test_a_trace_sees_the_denoisers_parameters_at_every_call():
    model = small_model()
    seen = []
    for _ in range(2):  # the second call finds them in the store
        with poutine.trace(param_only=True) as tr:
            model.predict_noise(X_T, T)
        seen.append(set(tr.trace.nodes))
    assert seen[0] == seen[1] == set(pyro.get_param_store().keys())
    assert len(seen[0]) == 4


def test_stored_parameters_are_not_registered_again_where_no_handler_acts_on_them(param_statements):
    model = small_model()
    model.predict_noise(X_T, T)
    assert len(param_statements) == 4 and len(pyro.get_param_store()) == 4  # the first call stores them
    model.predict_noise(X_T, T)
    with SubsamplePlate("data", torch.arange(2)):  # fit's minibatch handler acts on sample sites only
        model.predict_noise(X_T, T)
    assert len(param_statements) == 4
    with poutine.trace():
        model.predict_noise(X_T, T)
    assert len(param_statements) == 8


def test_a_cleared_parameter_store_is_filled_again():
    model = small_model()
    model.predict_noise(X_T, T)
    names = set(pyro.get_param_store().keys())
    pyro.clear_param_store()
    model.predict_noise(X_T, T)
    assert set(pyro.get_param_store().keys()) == names
    stored = {id(pyro.get_param_store().get_param(n).unconstrained()) for n in names}
    assert stored == {id(p) for p in model.denoiser.parameters()}


def test_plain_svi_updates_the_denoiser_at_every_step():
    model = small_model()
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), TimeSubsampledELBO())
    x = torch.randn(16, 2)
    for _ in range(3):
        before = model.denoiser.net[0].weight.detach().clone()
        svi.step(x)
        assert not torch.equal(before, model.denoiser.net[0].weight)


def test_a_fit_ends_where_it_ends_with_the_parameters_registered_at_every_step(monkeypatch):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    fitted = []
    for register_always in (False, True):
        if register_always:
            monkeypatch.setattr(freqvi.models.diffusion, "submodule", getattr)
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = small_model()
        freqvi.fit(model, x, loss="time_subsampled", time_sampling="importance", batch_size=16, num_steps=20,
                   seed=0, progress=False)
        fitted.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*fitted, strict=True))

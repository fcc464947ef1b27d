"""``fit`` stops on a time budget, on a callback's request and on Ctrl-C, and gives its result back."""

import os
import signal

import pyro
import pyro.distributions as dist
import pytest
import torch

import freqvi
from freqvi.errors import FitInterruptedWarning, FreqviInputError
from freqvi.infer.checkpoint import load_checkpoint

X = torch.randn(40, generator=torch.Generator().manual_seed(1)) + 2.0


def model(x):
    """z_i ~ N(mu, 1), x_i ~ N(z_i, 1)."""
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    """A Gaussian per observation with free mean and scale."""
    loc = pyro.param("loc", torch.zeros(x.shape[0]))
    scale = pyro.param("scale", torch.ones(x.shape[0]), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def exact_guide(x):
    """The exact posterior, N((x_i + mu) / 2, 1/2): it takes new observations."""
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((x + mu) / 2, 0.5 ** 0.5))


def run(guide=guide, **options):
    pyro.clear_param_store()
    result = freqvi.fit(model, guide=guide, data=X, seed=0, progress=False, lr=0.05, **options)
    return result, {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def assert_same_parameters(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("budget", "clock"), [("max_time", "wall_time"), ("max_cpu_time", "cpu_time")])
def test_the_step_that_spends_the_time_budget_is_the_last(budget, clock):
    seen = []
    result, _ = run(num_steps=10**7, **{budget: 0.3}, on_step=lambda r: seen.append(getattr(r, clock)))
    assert result.stop_reason == budget and not result.converged and not result.interrupted
    assert len(seen) == result.num_steps == len(result.elbo)
    assert seen[-2] < 0.3 <= seen[-1]  # every step before the last began and ended inside the budget
    assert getattr(result, clock) >= seen[-1]


def test_a_step_callback_that_asks_to_stop_returns_the_result_of_the_steps_taken():
    calls = []
    result, params = run(num_steps=1000, on_step=[calls.append, lambda r: r.num_steps == 7])
    assert result.stop_reason == "on_step" and result.num_steps == 7 and len(result.elbo) == 7
    assert len(calls) == 7  # every callback sees every step
    same, reference = run(num_steps=7)
    assert same.elbo == result.elbo
    assert_same_parameters(params, reference)


def test_an_evaluation_callback_stops_after_the_evaluation_it_saw():
    held_out = X[:10] + 0.1
    result, _ = run(exact_guide, num_steps=1000, validation_data=held_out, eval_every=5,
                    on_evaluation=lambda r: len(r.validation_elbo) == 2)
    assert result.stop_reason == "on_evaluation" and result.num_steps == 10
    assert result.validation_steps == [5, 10] and result.best_step in (5, 10)


def test_ctrl_c_returns_the_result_with_a_warning_and_leaves_a_checkpoint(tmp_path):
    path = tmp_path / "fit.ckpt"

    def interrupt_at_five(r):
        if r.num_steps == 5:
            os.kill(os.getpid(), signal.SIGINT)  # seen between steps: step 6 is the last

    before = signal.getsignal(signal.SIGINT)
    with pytest.warns(FitInterruptedWarning, match="interrupted after step 6 of 1000"):
        result, params = run(num_steps=1000, on_step=interrupt_at_five, checkpoint=path,
                             checkpoint_every=10**6)
    assert result.interrupted and result.stop_reason == "interrupted" and result.num_steps == 6
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(path)[0]["step"] == 6
    _, reference = run(num_steps=6)
    assert_same_parameters(params, reference)


def test_a_second_ctrl_c_stops_at_once():
    def interrupt_twice(r):
        if r.num_steps == 5:
            os.kill(os.getpid(), signal.SIGINT)  # deferred to the end of the step
            os.kill(os.getpid(), signal.SIGINT)  # the default handler's KeyboardInterrupt, here

    with pytest.raises(KeyboardInterrupt):
        run(num_steps=1000, on_step=interrupt_twice)


@pytest.mark.parametrize(("option", "message"), [
    ({"max_time": 0}, "max_time must be a finite number > 0; got 0"),
    ({"max_cpu_time": -1.0}, "max_cpu_time must be a finite number > 0; got -1.0"),
    ({"max_time": "1s"}, "max_time must be a finite number > 0; got '1s'"),
    ({"on_step": 3}, "on_step must be a callable or a list of callables; got 3"),
    ({"on_evaluation": [print, None]}, "on_evaluation must be a callable or a list of callables"),
])
def test_bad_budgets_and_callbacks_are_refused_before_any_step(option, message):
    def refusing_model(x):
        raise AssertionError("the model ran")

    with pytest.raises(FreqviInputError, match=message):
        freqvi.fit(refusing_model, guide=guide, data=X, progress=False, **option)

"""The thread policy: drivers size torch's intra-op threads to the work and give the caller's back."""

import inspect
import os
import subprocess
import sys
import time

import pyro
import pyro.distributions as dist
import pytest
import torch

import freqvi
from freqvi.cli import main
from freqvi.datasets import load_iris
from freqvi.errors import ConvergenceWarning, FreqviInputError
from freqvi.infer import threads
from freqvi.infer.threads import ENV_VAR, SMALL_WORK, intra_op_threads, step_entries
from freqvi.models import GaussianMixture

DRIVERS = [freqvi.fit, freqvi.em, freqvi.log_likelihood, freqvi.observed_information, freqvi.bootstrap,
           freqvi.compare, freqvi.information_criteria, freqvi.maximize_likelihood, freqvi.elbo_terms,
           freqvi.amortization_gap, freqvi.infer.diffusion.diffusion_bound, freqvi.gradient_variance]


@pytest.fixture
def caller_threads(monkeypatch):
    """The test runs with the caller at 3 threads (not 1, the policy's small-work count) and no
    FREQVI_NUM_THREADS; torch's count is put back afterwards."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def _recording_model(seen: list[int]):
    """A model (z_i ~ N(mu, 1), x_i ~ N(z_i, 1)) and its exact guide that record torch's thread count."""
    def model(x):
        seen.append(torch.get_num_threads())
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]) as rows:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[rows])

    def guide(x):
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]) as rows:
            pyro.sample("z", dist.Normal((x[rows] + mu) / 2, 0.5 ** 0.5))
    return model, guide


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.__name__)
def test_every_driver_takes_num_threads(driver):
    parameter = inspect.signature(driver).parameters["num_threads"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None
    assert ":param num_threads:" in driver.__doc__


def test_small_work_runs_on_one_thread_and_the_callers_count_comes_back(caller_threads):
    seen = []
    model, guide = _recording_model(seen)
    freqvi.fit(model, guide=guide, data=torch.randn(50), num_steps=3, progress=False)
    assert set(seen) == {1}
    assert torch.get_num_threads() == caller_threads


def test_gradient_variance_runs_small_work_on_one_thread_and_gives_the_callers_count_back(caller_threads):
    seen = []
    model, guide = _recording_model(seen)
    freqvi.gradient_variance(model, torch.randn(50), guide, num_draws=3)
    assert len(seen) >= 3 and set(seen) == {1}
    assert torch.get_num_threads() == caller_threads


@pytest.mark.parametrize(("busy", "expected"), [(0, 3), (6, 2), (7, 1), (12, 1)])
def test_large_work_gets_the_callers_count_capped_by_free_cores(caller_threads, monkeypatch, busy, expected):
    """On 8 usable cores with ``busy`` of them taken by other runnable tasks."""
    monkeypatch.setattr(threads, "_usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "_busy_cores", lambda: busy)
    seen = []
    model, guide = _recording_model(seen)
    freqvi.fit(model, guide=guide, data=torch.randn(SMALL_WORK), num_steps=2, progress=False)
    assert set(seen) == {expected}
    assert torch.get_num_threads() == caller_threads


def test_a_one_thread_caller_is_not_slowed_by_a_look_at_the_load(monkeypatch):
    """One thread is what rule 4 can give at most: the look at ``/proc`` (two pauses) is skipped."""
    def looked():
        raise AssertionError("the load was read")

    monkeypatch.setattr(threads, "_busy_cores", looked)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threads.intra_op_threads(entries=10 * SMALL_WORK) as count:
            assert count == 1
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="reads Linux's /proc/loadavg")
def test_busy_processes_are_counted():
    loop = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end:\n    pass\n"
    children = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert threads._busy_cores() >= 2  # ours, and whatever else runs on the machine
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_minibatches_size_the_work_by_the_rows_of_a_step(caller_threads):
    seen = []
    model, guide = _recording_model(seen)
    freqvi.fit(model, guide=guide, data=torch.randn(SMALL_WORK), num_steps=2, batch_size=100, progress=False)
    assert set(seen) == {1}
    assert step_entries((torch.zeros(1000, 7), torch.zeros(1000)), batch_size=10) == 80
    assert step_entries(iter([torch.zeros(3)])) is None  # a stream: unknown until read


def test_the_argument_and_the_environment_override_the_size_rule(caller_threads, monkeypatch):
    seen = []
    model, guide = _recording_model(seen)
    freqvi.fit(model, guide=guide, data=torch.randn(50), num_steps=2, progress=False, num_threads=2)
    assert set(seen) == {2}
    seen.clear()
    monkeypatch.setenv(ENV_VAR, "2")
    freqvi.fit(model, guide=guide, data=torch.randn(50), num_steps=2, progress=False)
    assert set(seen) == {2}
    seen.clear()
    freqvi.fit(model, guide=guide, data=torch.randn(50), num_steps=2, progress=False, num_threads=1)
    assert set(seen) == {1}  # the argument before the environment
    assert torch.get_num_threads() == caller_threads


def test_an_explicit_count_holds_for_the_drivers_called_inside(caller_threads):
    seen = []
    model, guide = _recording_model(seen)
    with intra_op_threads(2):
        freqvi.fit(model, guide=guide, data=torch.randn(50), num_steps=2, progress=False)
    assert set(seen) == {2}
    assert torch.get_num_threads() == caller_threads


def test_the_callers_count_comes_back_after_an_error(caller_threads):
    def model(x):
        assert torch.get_num_threads() == 1
        raise RuntimeError("the model fails")

    with pytest.raises(freqvi.errors.FreqviInputError, match="the model fails"):  # not raw (issue 17)
        freqvi.log_likelihood(model, torch.randn(20))
    assert torch.get_num_threads() == caller_threads
    with pytest.raises(KeyError), intra_op_threads(2):
        raise KeyError("inside the block")
    assert torch.get_num_threads() == caller_threads
    assert threads._explicit.get() is None


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_a_bad_count_is_refused_before_any_work(caller_threads, value):
    def model(x):
        raise AssertionError("the model ran")

    with pytest.raises(FreqviInputError, match=r"num_threads must be a positive integer; got"):
        freqvi.log_likelihood(model, torch.randn(20), num_threads=value)
    assert torch.get_num_threads() == caller_threads


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
def test_a_bad_environment_variable_is_refused(caller_threads, monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(FreqviInputError, match=f"environment variable {ENV_VAR} must be a positive integer"):
        freqvi.em(GaussianMixture(2, 4), load_iris(), progress=False)
    assert torch.get_num_threads() == caller_threads


def test_the_console_command_runs_on_one_thread_and_takes_threads(caller_threads, monkeypatch, capsys):
    seen = []
    original = freqvi.em

    def spying_em(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(freqvi, "em", spying_em)
    assert main(["--quiet", "--max-iter", "3"]) == 0
    assert main(["--quiet", "--max-iter", "3", "--threads", "2"]) == 0
    assert seen == [1, 2]
    assert torch.get_num_threads() == caller_threads
    assert main(["--quiet", "--threads", "0"]) == 2
    assert "argument --threads: expected an integer >= 1; got '0'" in capsys.readouterr().err


def test_a_drivers_warning_points_at_its_caller_not_at_the_wrapper(caller_threads):
    def model(x):
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.warns(ConvergenceWarning) as record:
        freqvi.maximize_likelihood(model, data=torch.randn(30) + 5, max_iter=1)
    assert {w.filename for w in record} == {__file__}

"""``em`` on Ctrl-C: the iteration under way finishes and the result comes back, as ``fit``'s does."""

import importlib
import os
import signal
import warnings

import pytest
import torch
from simulate import mixture_data

import freqvi
from freqvi.errors import ConvergenceWarning, FitInterruptedWarning
from freqvi.infer.checkpoint import load_checkpoint
from freqvi.models import GaussianMixture

em_module = importlib.import_module("freqvi.infer.em")  # the package exports the function under this name
X = mixture_data(n=300)


def run(max_iter=100, quiet=True, **options):
    """Exact EM with the closed-form M-step on a fresh 3-component mixture from seed 0, tol 0 (no early stop;
    a run to max_iter warns that it did not converge, which is not what these tests look at)."""
    model = GaussianMixture(3, X.shape[1])
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", ConvergenceWarning)
        result = freqvi.em(model, X, max_iter=max_iter, tol=0.0, seed=0, progress=False, **options)
    return result, {k: v.clone() for k, v in model.estimates().items()}


def signal_during(monkeypatch, iteration: int, times: int, signum=signal.SIGINT) -> None:
    """Sends ``signum`` ``times`` to this process in the middle of EM iteration ``iteration`` (its M-step)."""
    iterate = em_module._EMStep.iterate
    calls = []

    def interrupted_iterate(self, posterior):
        calls.append(1)
        if len(calls) == iteration:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return iterate(self, posterior)

    monkeypatch.setattr(em_module._EMStep, "iterate", interrupted_iterate)


def test_ctrl_c_finishes_the_iteration_and_returns_the_result_with_a_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "em.ckpt"
    signal_during(monkeypatch, iteration=4, times=1)
    before = signal.getsignal(signal.SIGINT)
    with pytest.warns(FitInterruptedWarning, match="em interrupted after iteration 4 of 100") as caught:
        result, params = run(checkpoint=path, checkpoint_every=10**6, quiet=False)
    assert [w.category for w in caught] == [FitInterruptedWarning]  # no ConvergenceWarning beside it
    assert result.interrupted and result.stop_reason == "interrupted" and not result.converged
    assert result.num_iter == 4 and len(result.log_likelihood) == 5
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(path)[0]["history"]["num_iter"] == 4
    monkeypatch.undo()
    reference_result, reference = run(max_iter=4)  # the same four iterations, uninterrupted
    assert result.log_likelihood == reference_result.log_likelihood
    for name in reference:
        assert torch.equal(params[name], reference[name]), name


def test_a_second_ctrl_c_stops_at_once_with_the_last_finished_iteration(monkeypatch):
    model = GaussianMixture(3, X.shape[1])
    signal_during(monkeypatch, iteration=4, times=2)
    with pytest.raises(KeyboardInterrupt):
        freqvi.em(model, X, max_iter=100, tol=0.0, seed=0, progress=False)
    monkeypatch.undo()
    _, reference = run(max_iter=3)  # iteration 4 was cut short: its parameters are undone
    for name, value in model.estimates().items():
        assert torch.equal(value, reference[name]), name


def test_sigterm_finishes_the_iteration_writes_the_checkpoint_and_raises(tmp_path, monkeypatch):
    """A scheduler's SIGTERM ends the process (after the checkpoint), where Ctrl-C returns the result."""
    path = tmp_path / "em.ckpt"
    signal_during(monkeypatch, iteration=2, times=1, signum=signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="em terminated after iteration 2; checkpoint in"):
        run(checkpoint=path, checkpoint_every=10**6)
    assert load_checkpoint(path)[0]["history"]["num_iter"] == 2

"""Issue 8's acceptance checks on faults: a killed process, crafted and truncated files, a NaN at step k."""

import math
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from simulate import factor_data, mixture_data

import freqvi
from freqvi.errors import CheckpointError, FreqviError, FreqviInputError
from freqvi.infer import checkpoint as checkpoint_module
from freqvi.infer.checkpoint import load_checkpoint
from freqvi.infer.run_state import RunState
from freqvi.models import FactorAnalysis, GaussianMixture

TESTS = Path(__file__).parent


def run(num_steps, **options):
    """A minibatched fit of a fresh factor model with its free guide, from seed 0."""
    fa = FactorAnalysis(5, 2)
    freqvi.fit(fa.model, factor_data(n=60), fa.mean_field_guide(), num_steps=num_steps, batch_size=16,
               lr=0.02, seed=0, progress=False, **options)
    return {k: v.clone() for k, v in fa.estimates().items()}


CHILD = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from test_fault_tolerance import run
run(10**7, checkpoint=sys.argv[1], checkpoint_every=7)
"""


def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    path = tmp_path / "fit.ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # several more checkpoints; the kill may land inside a write
        assert child.poll() is None, child.stderr.read().decode()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(path)[0]["step"]  # the last complete write, whatever the kill interrupted
    assert stopped_at > 0 and stopped_at % 7 == 0
    whole = run(stopped_at + 12)
    resumed = run(stopped_at + 12, resume=path)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


def wait_for(path: Path, child: subprocess.Popen, seconds: float = 60) -> None:
    """Waits until ``path`` exists, failing if the child process ends first or time runs out."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_process_writing_the_same_checkpoint_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stderr=subprocess.PIPE)
    try:
        wait_for(path, child)  # its first checkpoint is written: it holds the lock
        with pytest.raises(CheckpointError, match=r"fit.ckpt' is being written by another run"):
            run(5, checkpoint=path)
        assert child.poll() is None
        assert load_checkpoint(path)[0]["step"] % 7 == 0  # the child's (every 7 steps), not one of step 5
    finally:
        child.send_signal(signal.SIGTERM)  # the child writes a last checkpoint and stops
        child.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.ckpt"]  # its lock file went with it
    run(5, checkpoint=path)
    assert load_checkpoint(path)[0]["step"] == 5


STALLED_WRITER = f"""
import sys, time
sys.path.insert(0, {str(TESTS)!r})
from freqvi.infer import checkpoint

def stall(file, data):  # half the bytes reach the temporary file, then the process waits to be killed
    file.write(data[: len(data) // 2])
    file.flush()
    open(sys.argv[2], "w").close()
    time.sleep(600)

checkpoint._write_all = stall
from test_fault_tolerance import run
run(10**7, checkpoint=sys.argv[1], checkpoint_every=3)
"""


@pytest.mark.slow
def test_kills_during_writes_leave_no_temporary_file_after_the_next_run(tmp_path):
    path, writing = tmp_path / "fit.ckpt", tmp_path / "writing"
    for kill in range(3):
        child = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(path), str(writing)],
                                 stderr=subprocess.PIPE)
        try:
            wait_for(writing, child)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        writing.unlink()
        # each run removed the temporary the kill before it left: one is there, this kill's
        assert len(list(tmp_path.glob(".fit.ckpt.*.tmp"))) == 1, kill
    assert not path.exists()
    run(5, checkpoint=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.ckpt"]
    assert load_checkpoint(path)[0]["step"] == 5


class RunsCode:
    """Unpickling this calls ``Path.touch`` on a marker file: code execution on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, writer):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    payload = {"state": RunsCode(marker), "metadata": "{}"}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(FreqviInputError, match="could run code when loaded, so it was refused"):
        run(10, resume=path)
    assert not marker.exists()


def test_a_write_cut_short_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path, partial = tmp_path / "fit.ckpt", tmp_path / "partial.ckpt"
    run(5, checkpoint=path)

    def die_before_the_disk_write(fd):  # the temporary file as a crash would leave it, then the crash
        temporary = next(tmp_path.glob(".fit.ckpt.*.tmp")).read_bytes()
        partial.write_bytes(temporary[: len(temporary) // 3])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint_module.os, "fsync", die_before_the_disk_write)
    with pytest.raises(KeyboardInterrupt, match="killed while writing"):
        run(10, resume=path, checkpoint=path, checkpoint_every=1)
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FreqviInputError, match=r"cannot be read .* truncated"):
        load_checkpoint(partial)
    assert load_checkpoint(path)[0]["step"] == 5
    whole, resumed = run(10), run(10, resume=path)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


def poisoned(from_step: int):
    """A model/guide pair whose model adds a NaN to the log-density from its ``from_step``-th step on.

    Calls with gradients enabled are the steps; the drivers' checks run without.
    """
    calls = [0]

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        if torch.is_grad_enabled():
            calls[0] += 1
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)
        pyro.factor("poison", torch.tensor(math.nan if calls[0] > from_step else 0.0))

    def guide(x):
        scale = pyro.param("scale", torch.tensor(0.8), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.5 * x, scale))

    return model, guide


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_nan_at_step_k_stops_with_the_parameters_of_step_k_minus_1(tmp_path):
    x, k = torch.linspace(-1.0, 2.0, 30), 6
    model, guide = poisoned(k)
    path = tmp_path / "fit.ckpt"
    # steps k, k+1, k+2, k+3 are refused (max_retries=3), each updating nothing; the last raises,
    # naming step k, the first that failed
    with pytest.raises(FreqviError, match=rf"^step {k}: the Trace_ELBO loss was nan in 4 draws in a row "
                                          rf"\(steps {k} to {k + 3}\); "
                                          r"the model's site 'poison' has a non-finite log-density"):
        freqvi.fit(model, x, guide, num_steps=50, lr=0.05, seed=3, progress=False, checkpoint=path,
                   checkpoint_every=1)
    stopped = {n: pyro.param(n).detach().clone() for n in ("loc", "scale")}
    saved = load_checkpoint(path)[0]
    pyro.clear_param_store()
    model, guide = poisoned(10**9)
    freqvi.fit(model, x, guide, num_steps=k, lr=0.05, seed=3, progress=False)  # steps 0 .. k-1
    for name, value in stopped.items():
        assert torch.equal(value, pyro.param(name).detach()), name
    assert saved["step"] == k + 3  # steps k..k+2 were refused (nothing updated) and checkpointed
    store = pyro.get_param_store()
    for name in stopped:
        assert torch.equal(saved["params"][name], store.get_param(name).unconstrained().detach()), name



@pytest.mark.parametrize(("seconds", "expected"), [(None, [6]), (1e-9, [1, 2, 3, 4, 5, 6])])
def test_checkpoint_seconds_writes_once_that_long_has_passed(tmp_path, monkeypatch, seconds, expected):
    written = []
    monkeypatch.setattr(RunState, "save", lambda self, path, step: written.append(step))
    run(6, checkpoint=tmp_path / "fit.ckpt", checkpoint_every=10**9, checkpoint_seconds=seconds)
    assert written == expected


def em_mixture(k: int, **options):
    """Exact EM on a k-component mixture of simulated 2-D data, from seed 0; the model and its result."""
    mixture = GaussianMixture(k, 2)
    result = freqvi.em(mixture, data=mixture_data(n=120), max_iter=3, tol=0.0, seed=0, progress=False,
                       **options)
    return mixture, result


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_a_checkpoint_of_the_other_driver_is_refused_saying_which_wrote_it(tmp_path):
    fit_path, em_path = tmp_path / "fit.ckpt", tmp_path / "em.ckpt"
    run(3, checkpoint=fit_path)
    em_mixture(2, checkpoint=em_path)
    with pytest.raises(FreqviInputError, match=r"was written by freqvi.em; this freqvi.fit run can resume "
                                               r"only from a checkpoint of freqvi.fit"):
        run(5, resume=em_path)
    with pytest.raises(FreqviInputError, match=r"was written by freqvi.fit; this freqvi.em run can resume "
                                               r"only from a checkpoint of freqvi.em"):
        em_mixture(2, resume=fit_path)


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_a_checkpoint_of_another_number_of_components_is_refused_and_nothing_restored(tmp_path):
    path = tmp_path / "em.ckpt"
    em_mixture(2, checkpoint=path)
    mixture, _ = em_mixture(3)
    before = {k: v.clone() for k, v in mixture.estimates().items()}
    expected = (r"holds \{'GaussianMixture.locs': 'shape \(2, 2\) float64', .*expected "
                r"\{'GaussianMixture.locs': 'shape \(3, 2\) float64'")
    with pytest.raises(FreqviInputError, match=expected):
        freqvi.em(mixture, data=mixture_data(n=120), max_iter=5, progress=False, resume=path)
    for name, value in mixture.estimates().items():
        assert torch.equal(value, before[name]), name


def rewritten(path: Path, edit) -> Path:
    """A copy of the checkpoint at ``path`` whose state ``edit`` changed, its SHA-256 digest recomputed."""
    state, metadata = load_checkpoint(path)
    edit(state)
    copy = path.with_name("edited-" + path.name)
    checkpoint_module.save_checkpoint(copy, state, {k: v for k, v in metadata.items()
                                                    if k not in ("format", "sha256")})
    return copy


def set_in(*keys, value):
    """An edit setting ``state[k1][k2]...`` to ``value``, or to ``value(old)`` if it is callable."""
    def edit(state):
        *outer, last = keys
        for key in outer:
            state = state[key]
        state[last] = value(state[last]) if callable(value) else value
    return edit


FIT_EDITS = {
    "a negative step": (set_in("step", value=-3), r"holds step = -3; expected a non-negative integer"),
    "a step below the history": (set_in("step", value=1), r"records 3 objectives at step 1"),
    "a parameter that would broadcast": (
        set_in("params", "FactorAnalysis.noise_variance", value=lambda v: v[:1]),
        r"holds \{'FactorAnalysis.noise_variance': 'shape \(1,\) float64'\}; expected "
        r"\{'FactorAnalysis.noise_variance': 'shape \(5,\) float64'\}"),
    "a float32 parameter": (set_in("params", "FactorAnalysis.loading", value=lambda v: v.float()),
                            r"'FactorAnalysis.loading': 'shape \(5, 2\) float32'"),
    "a parameter fewer": (lambda s: s["params"].pop("FactorAnalysis.loading"),
                          r"holds parameters \['FactorAnalysis.mean', .*expected this run's parameters "
                          r"\['FactorAnalysis.loading', 'FactorAnalysis.mean', "),
    "a NaN parameter": (set_in("params", "FactorAnalysis.mean", value=lambda v: v * math.nan),
                        r"holds non-finite values in \['FactorAnalysis.mean'\]"),
    "an optimiser moment that would broadcast": (
        set_in("optimizer", "state", 0, "exp_avg", value=lambda v: v.flatten()[:1]),
        r"holds a 'optimizer' state shape \(1,\) float64 for a parameter of shape \(5, 2\) float64"),
    "a truncated generator state": (set_in("ranks", 0, "rng", "torch", value=lambda v: v[:100]),
                                    r"holds random generator states the generators refuse"),
    "a minibatch order past the rows": (set_in("ranks", 0, "batches", "order", value=lambda v: v + 1),
                                        r"holds a minibatch order shape \(60,\) int64 at position 48"),
    "a negative minibatch position": (set_in("ranks", 0, "batches", "position", value=-16),
                                      r"at position -16; expected a permutation of the rows"),
    "a history with a NaN": (set_in("history", "elbo", value=lambda v: [*v[:-1], math.nan]),
                             r"holds a history.elbo that is not a list of finite numbers"),
}


@pytest.mark.parametrize("case", sorted(FIT_EDITS))
def test_an_edited_fit_checkpoint_with_its_digest_recomputed_is_refused(tmp_path, case):
    path = tmp_path / "fit.ckpt"
    run(3, checkpoint=path)
    edit, message = FIT_EDITS[case]
    with pytest.raises(FreqviInputError, match=message):
        run(5, resume=rewritten(path, edit))


EM_EDITS = {
    "a negative iteration count": (set_in("history", "num_iter", value=-1), r"holds history.num_iter = -1"),
    "an iteration count off its history": (set_in("history", "num_iter", value=1),
                                           r"records 4 objectives after 1 iterations"),
    "a boolean for a count": (set_in("t", value=True), r"holds t = True; expected a non-negative integer"),
    "a numpy generator state cut short": (set_in("rng", "numpy", value=lambda v: v[:2]),
                                          r"holds random generator states the generators refuse"),
}


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
@pytest.mark.parametrize("case", sorted(EM_EDITS))
def test_an_edited_em_checkpoint_with_its_digest_recomputed_is_refused(tmp_path, case):
    path = tmp_path / "em.ckpt"
    em_mixture(2, checkpoint=path)
    edit, message = EM_EDITS[case]
    with pytest.raises(FreqviInputError, match=message):
        em_mixture(2, resume=rewritten(path, edit))

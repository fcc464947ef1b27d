"""Checkpoints: an interrupted and resumed fit ends where an uninterrupted one does, bit for bit."""

import errno
import math
import os
import re
import signal
import stat
import tempfile
import threading

import pyro
import pytest
import torch
from simulate import factor_data

import freqvi
from freqvi.errors import CheckpointError, FreqviInputError
from freqvi.infer import checkpoint as checkpoint_module
from freqvi.infer.checkpoint import checkpoint_lock, load_checkpoint
from freqvi.models import FactorAnalysis


def run(num_steps, **options):
    """A minibatched fit of a fresh factor model with its free guide, from seed 0."""
    fa = FactorAnalysis(5, 2)
    guide = fa.mean_field_guide()
    result = freqvi.fit(fa.model, factor_data(n=60), guide, num_steps=num_steps, batch_size=16, lr=0.02,
                        seed=0, progress=False, **options)
    return {k: v.clone() for k, v in fa.estimates().items()}, result


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole, whole_result = run(40)
    halfway = tmp_path / "half.ckpt"
    first, _ = run(21, checkpoint=halfway)  # written at its last step
    assert not all(torch.equal(first[k], whole[k]) for k in whole)
    resumed, result = run(40, resume=halfway)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    assert result.elbo == whole_result.elbo


def test_an_interrupted_run_leaves_a_checkpoint_to_resume_from(tmp_path):
    path = tmp_path / "fit.ckpt"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="checkpoint in"):
            run(100_000, checkpoint=path, checkpoint_every=10**9)
    finally:
        timer.cancel()
    stopped_at = load_checkpoint(path)[0]["step"]
    whole, _ = run(stopped_at + 10)
    resumed, _ = run(stopped_at + 10, resume=path)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "fit.ckpt"
    run(5, checkpoint=path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FreqviInputError, match=r"cannot be read .* truncated, tampered with"):
        run(10, resume=path)


def test_resuming_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    run(5, checkpoint=path)
    with pytest.raises(FreqviInputError, match="resume with the same estimator and batch_size"):
        run(10, resume=path, loss="mean_field")


def test_a_changed_byte_is_caught(tmp_path):
    path = tmp_path / "fit.ckpt"
    run(5, checkpoint=path)
    payload = torch.load(path, weights_only=True)
    payload["state"][len(payload["state"]) // 2] ^= 1  # one flipped bit inside a tensor's data
    torch.save(payload, path)
    with pytest.raises(FreqviInputError, match="SHA-256"):
        run(10, resume=path)


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
@pytest.mark.parametrize("guide", ["exact", "mean_field"])
def test_resumed_em_equals_the_uninterrupted_one(tmp_path, guide):
    def em_run(max_iter, **options):
        fa = FactorAnalysis(5, 2)
        q = fa.guide if guide == "exact" else fa.mean_field_guide()
        result = freqvi.em(fa, factor_data(n=60), q, max_iter=max_iter, tol=0.0, e_step_iters=5,
                           m_step="gradient" if guide == "mean_field" else "auto", m_step_iters=5,
                           seed=0, progress=False, **options)
        return {k: v.clone() for k, v in fa.estimates().items()}, result

    whole, whole_result = em_run(8)
    path = tmp_path / "em.ckpt"
    em_run(3, checkpoint=path)
    resumed, result = em_run(8, resume=path)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    assert result.log_likelihood == whole_result.log_likelihood


def em_run(max_iter, **options):
    """Exact EM on a fresh factor model, from seed 0."""
    fa = FactorAnalysis(5, 2)
    return freqvi.em(fa, data=factor_data(n=60), max_iter=max_iter, tol=0.0, seed=0, progress=False,
                     **options)


def special_file(folder, kind):
    """A path in ``folder`` holding something other than a regular file, made here (never a system path)."""
    path = folder / kind
    if kind == "device":
        try:  # the null device's numbers, on a node of our own
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("this process may not create device nodes (os.mknod needs CAP_MKNOD)")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
@pytest.mark.parametrize("driver", [run, em_run])
@pytest.mark.parametrize(("kind", "described"), [("device", "a character device"), ("fifo", "a FIFO"),
                                                 ("directory", "a directory")])
def test_a_path_that_is_not_a_regular_file_is_refused_before_any_work_and_left_alone(
        tmp_path, driver, kind, described):
    path = special_file(tmp_path, kind)
    mode = path.stat().st_mode
    with pytest.raises(FreqviInputError, match=f"is {described}, not a regular file"):
        driver(5, checkpoint=path)
    assert not pyro.get_param_store().keys()  # refused before the model was first run
    assert path.stat().st_mode == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


@pytest.mark.parametrize("driver", [run, em_run])
def test_an_empty_path_is_refused_before_any_work(driver):
    with pytest.raises(FreqviInputError, match="checkpoint must name a file; got an empty path"):
        driver(5, checkpoint="")
    assert not pyro.get_param_store().keys()


def test_a_folder_where_no_file_can_be_created_is_refused_before_any_work(tmp_path, monkeypatch):
    def refuse(**options):  # what mkstemp raises in a folder without write permission
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refuse)
    with pytest.raises(FreqviInputError, match=r"no file can be created in the folder .*Permission denied"):
        run(5, checkpoint=tmp_path / "fit.ckpt")
    assert not pyro.get_param_store().keys()


def test_a_checkpoint_behind_a_symbolic_link_is_written_through_it(tmp_path):
    target, link = tmp_path / "target.ckpt", tmp_path / "link.ckpt"
    target.write_bytes(b"")
    link.symlink_to(target)
    run(3, checkpoint=link)
    assert link.is_symlink() and load_checkpoint(target)[0]["step"] == 3


def test_a_full_disk_is_a_checkpoint_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    path = tmp_path / "fit.ckpt"
    run(5, checkpoint=path)
    before = path.read_bytes()

    def disk_full(file, data):  # a third of the bytes fit, then the device is full
        file.write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module, "_write_all", disk_full)
    expected = (rf"checkpoint '{re.escape(str(path))}' could not be written \(OSError: .*No space left on "
                r"device\); the previous checkpoint there, if any, is intact")
    with pytest.raises(CheckpointError, match=expected):
        run(10, resume=path, checkpoint=path, checkpoint_every=1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.ckpt"]  # no temporary, no lock file


def test_a_second_writer_of_the_same_checkpoint_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    with checkpoint_lock(path):  # held as a run in progress holds it
        with pytest.raises(CheckpointError, match="is being written by another run"):
            run(5, checkpoint=path)
        assert not path.exists()  # refused before its first step
    run(5, checkpoint=path)  # the lock is released with the run holding it
    assert load_checkpoint(path)[0]["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.ckpt"]


def test_stale_temporaries_of_this_checkpoint_are_removed_and_no_others(tmp_path):
    path = tmp_path / "fit.ckpt"
    stale = [tempfile.mkstemp(dir=tmp_path, prefix=".fit.ckpt.", suffix=".tmp") for _ in range(3)]
    others = [tempfile.mkstemp(dir=tmp_path, prefix=f".{name}.", suffix=".tmp")[1]
              for name in ("fit.ckpt.old", "fit")]  # those of checkpoints named fit.ckpt.old and fit
    for handle, _ in stale:
        os.close(handle)
    run(3, checkpoint=path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["fit.ckpt", *(os.path.basename(o) for o in others)])


@pytest.mark.parametrize(("resume", "message"), [
    (123, "a checkpoint to resume from must be a path \\(str or os.PathLike\\); got int"),
    ("missing.ckpt", "'missing.ckpt' does not exist or is not a regular file"),
    (".", "'.' does not exist or is not a regular file"),
])
def test_a_resume_path_that_names_no_checkpoint_file_is_refused(resume, message):
    with pytest.raises(FreqviInputError, match=message):
        run(5, resume=resume)


@pytest.mark.parametrize("folder", ["missing", "a-file"])
def test_a_path_in_no_folder_is_refused_before_any_work(tmp_path, folder):
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(FreqviInputError, match=rf"the folder of .*{folder}.* does not exist or is not a"):
        run(5, checkpoint=tmp_path / folder / "fit.ckpt")
    assert not pyro.get_param_store().keys()


# ----- held-out evaluations (validation_data) in checkpoints ---------------------------------------------
def held_out_run(num_steps, **options):
    """:func:`run` with its exact-posterior guide (a free guide has nothing for new rows), evaluated on
    held-out rows every 5 steps."""
    fa = FactorAnalysis(5, 2)
    result = freqvi.fit(fa, factor_data(n=60), num_steps=num_steps, batch_size=16, lr=0.02, seed=0,
                        progress=False, **{"validation_data": factor_data(n=30, seed=5), "eval_every": 5,
                                           **options})
    return {k: v.clone() for k, v in fa.estimates().items()}, result


@pytest.mark.parametrize("stop", [12, 15], ids=["off-schedule", "on-schedule"])
def test_a_resumed_run_with_held_out_data_equals_the_uninterrupted_one(tmp_path, stop):
    """The reference: the uninterrupted run. A run stopped at step 12 evaluates there, after its
    checkpoint; the resumed run must not count that evaluation (the uninterrupted one never made it), or
    its best step and the parameters it keeps could differ."""
    whole, whole_result = held_out_run(30)
    path = tmp_path / "held-out.ckpt"
    _, first = held_out_run(stop, checkpoint=path)
    assert first.validation_steps == [*range(5, stop + 1, 5), *([stop] if stop % 5 else [])]
    resumed, result = held_out_run(30, resume=path)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    assert result.validation_steps == whole_result.validation_steps == [5, 10, 15, 20, 25, 30]
    assert result.validation_elbo == whole_result.validation_elbo
    assert result.best_step == whole_result.best_step and result.elbo == whole_result.elbo


def test_a_checkpoint_without_held_out_evaluations_is_refused_by_a_run_with_them(tmp_path):
    path = tmp_path / "fit.ckpt"
    held_out_run(5, checkpoint=path, validation_data=None)
    with pytest.raises(FreqviInputError, match="resume with the same estimator"):
        held_out_run(10, resume=path)


@pytest.mark.parametrize(("edit", "found"), [
    (lambda v: {**v, "best_step": 5}, r"\[5, 10\]"),  # not the argmax: 10 holds the larger ELBO below
    (lambda v: {**v, "steps": [10, 5]}, r"\[10, 5\]"),
    (lambda v: {**v, "steps": [5, 99]}, r"\[5, 99\]"),
    (lambda v: {**v, "elbo": [v["elbo"][0], math.nan]}, r"\[5, 10\]"),
    (lambda v: {**v, "best": [b[..., :1] for b in v["best"]]}, r"\[5, 10\]"),
    (lambda v: None, "None"),
], ids=["best-not-argmax", "unordered", "past-the-step", "nan", "broadcast-shape", "missing"])
def test_an_edited_held_out_history_is_refused_and_nothing_restored(tmp_path, edit, found):
    from test_fault_tolerance import rewritten, set_in

    path = tmp_path / "fit.ckpt"
    held_out_run(10, checkpoint=path)
    state = load_checkpoint(path)[0]["validation"]
    assert state["steps"] == [5, 10] and state["best_step"] == 10  # what best-not-argmax relies on
    fa = FactorAnalysis(5, 2)
    fa.model(factor_data(n=60))  # parameters made, for the refusal to leave alone
    before = {k: v.clone() for k, v in fa.estimates().items()}
    with pytest.raises(FreqviInputError, match=rf"held-out evaluation history .*steps {found}"):
        freqvi.fit(fa, factor_data(n=60), num_steps=20, batch_size=16, lr=0.02, seed=0, progress=False,
                   validation_data=factor_data(n=30, seed=5), eval_every=5,
                   resume=rewritten(path, set_in("validation", value=edit)))
    for name, value in fa.estimates().items():
        assert torch.equal(value, before[name]), name


# ----- an estimator's own state (the importance law of the time-subsampled ELBO) ------------------------
def diffusion_run(num_steps, **options):
    """A diffusion model fitted with importance-sampled time steps, whose law adapts step by step."""
    from freqvi.datasets import load_moons
    from freqvi.models import GaussianDiffusion

    torch.manual_seed(0)
    model = GaussianDiffusion(2, 20, hidden=(16,))
    result = freqvi.fit(model, load_moons("train")[:200], loss="time_subsampled", time_sampling="importance",
                        num_steps=num_steps, batch_size=50, lr=0.01, seed=0, progress=False, **options)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def test_a_resumed_run_draws_the_time_steps_an_uninterrupted_one_does(tmp_path):
    """Without the importance law in the checkpoint, the resumed run restarts it at uniform: other t."""
    whole, whole_result = diffusion_run(30)
    path = tmp_path / "diffusion.ckpt"
    diffusion_run(12, checkpoint=path)
    law = load_checkpoint(path)[0]["estimator"]
    assert law["weight"].shape == (20,) and (law["weight"] > 0).all()  # every t drawn by step 12: adapted
    resumed, result = diffusion_run(30, resume=path)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    assert result.elbo == whole_result.elbo


@pytest.mark.parametrize("edit", [lambda law: {**law, "weight": -law["weight"]},
                                  lambda law: {**law, "second_moment": law["second_moment"][:3]},
                                  lambda law: None], ids=["negative", "short", "missing"])
def test_an_edited_estimator_state_is_refused(tmp_path, edit):
    from test_fault_tolerance import rewritten, set_in

    path = tmp_path / "diffusion.ckpt"
    diffusion_run(12, checkpoint=path)
    with pytest.raises(FreqviInputError, match="time-subsampled ELBO's state must hold"):
        diffusion_run(20, resume=rewritten(path, set_in("estimator", value=edit)))


@pytest.mark.parametrize("contents", [b"a,b\n0.1,0.2\n", b"", bytes(range(256)) * 4, b"\x80\x02]q\x00."],
                         ids=["csv", "empty", "bytes", "a-pickled-empty-list"])
def test_a_file_that_is_no_checkpoint_is_refused_as_one(tmp_path, contents):
    """torch's unpickler fed a CSV raised a raw IndexError ("pop from empty list")."""
    path = tmp_path / "data.csv"
    path.write_bytes(contents)
    with pytest.raises(FreqviInputError, match="not a freqvi checkpoint"):
        run(5, resume=path)
    assert path.read_bytes() == contents

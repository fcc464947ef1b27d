"""Checkpoints: an interrupted and resumed fit ends where an uninterrupted one does, bit for bit."""

import os
import signal
import threading

import pytest
import torch
from simulate import factor_data

import freqvi
from freqvi.errors import FreqviInputError
from freqvi.infer.checkpoint import load_checkpoint
from freqvi.models import FactorAnalysis


def run(num_steps, **options):
    """A minibatched fit of a fresh factor model with its free guide, from seed 0."""
    fa = FactorAnalysis(5, 2)
    guide = fa.mean_field_guide()
    result = freqvi.fit(fa.model, guide, factor_data(n=60), num_steps=num_steps, batch_size=16, lr=0.02,
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

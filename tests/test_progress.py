"""Progress bars that inform: fit shows the running mean of its noisy ELBO estimates and its s.e."""

import re

import numpy as np
import pytest
import torch

import freqvi
from freqvi.infer.fit import PROGRESS_WINDOW, progress_text
from freqvi.models import FactorAnalysis


def _shown(text: str) -> tuple[float, float, int]:
    match = re.fullmatch(r"ELBO (\S+) ± (\S+) \(mean ± s\.e\. of the last (\d+) steps\)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2)), int(match.group(3))


def test_progress_text_is_the_window_mean_and_its_standard_error():
    values = np.random.default_rng(0).normal(-2000.0, 4000.0, size=350)  # one-draw estimates, very noisy
    mean, se, count = _shown(progress_text(values.tolist()))
    last = values[-PROGRESS_WINDOW:]
    assert count == PROGRESS_WINDOW
    assert mean == pytest.approx(last.mean(), rel=1e-4)  # printed to 5 significant digits
    assert se == pytest.approx(last.std(ddof=1) / np.sqrt(PROGRESS_WINDOW), rel=0.05)  # 2 digits
    assert _shown(progress_text(values[:7].tolist()))[2] == 7
    assert progress_text([-3.5]) == "ELBO -3.5 (one step)"


def test_fit_bar_shows_the_running_mean(capsys):
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    result = freqvi.fit(FactorAnalysis(3, 1), x, num_steps=60, seed=0, progress=True)
    err = capsys.readouterr().err
    shown = re.findall(r"ELBO \S+ ± \S+ \(mean ± s\.e\. of the last \d+ steps\)", err)
    assert shown, err
    mean, _, count = _shown(shown[-1])
    # the last update is at step 51 (every tenth step): the mean of the 51 estimates up to it
    assert count == 51 and mean == pytest.approx(np.mean(result.elbo[:51]), rel=1e-4)

"""Every public driver meets malformed input with a freqvi error before any work, never a deep trace."""

import itertools

import numpy as np
import pytest
import torch

import freqvi
from freqvi.errors import FreqviError
from freqvi.guides import AmortizedNormal, LocalMeanField
from freqvi.models import FactorAnalysis, GaussianMixture

GOOD = np.random.default_rng(0).normal(size=(40, 3))


def nan_data():
    x = GOOD.copy()
    x[5, 1] = np.nan
    return x


def inf_data():
    x = GOOD.copy()
    x[0, 0] = np.inf
    return x


BAD_DATA = {
    "nan": nan_data,
    "inf": inf_data,
    "one-dimensional": lambda: GOOD[:, 0],
    "three-dimensional": lambda: GOOD[None],
    "wrong-width": lambda: GOOD[:, :2],
    "empty": lambda: GOOD[:0],
    "strings": lambda: np.array([["a", "b", "c"]] * 5),
    "booleans": lambda: GOOD > 0,
    "ragged-list": lambda: [[1.0, 2.0, 3.0], [1.0]],
    "none": lambda: None,
}

DRIVERS = {
    "em": lambda model, x: freqvi.em(model, x, progress=False),
    "fit": lambda model, x: freqvi.fit(model, x, num_steps=2, progress=False),
    "log_likelihood": lambda model, x: freqvi.log_likelihood(model, x),
    "observed_information": lambda model, x: freqvi.observed_information(model, x),
    "information_criteria": lambda model, x: freqvi.information_criteria(model, x),
}

MODELS = {"mixture": lambda: GaussianMixture(2, 3), "factor": lambda: FactorAnalysis(3, 1)}


@pytest.mark.parametrize(("model", "driver", "data"),
                         list(itertools.product(MODELS, DRIVERS, BAD_DATA)))
def test_bad_data_is_a_freqvi_error(model, driver, data):
    with pytest.raises(FreqviError) as caught:
        DRIVERS[driver](MODELS[model](), BAD_DATA[data]())
    assert str(caught.value)  # a message, not an empty error


BAD_OPTIONS = {
    "em-max_iter-0": lambda m: freqvi.em(m, GOOD, max_iter=0, progress=False),
    "em-tol-negative": lambda m: freqvi.em(m, GOOD, tol=-1.0, progress=False),
    "em-batch_size-0": lambda m: freqvi.em(m, GOOD, batch_size=0, progress=False),
    "em-batch_size-too-big": lambda m: freqvi.em(m, GOOD, batch_size=41, progress=False),
    "em-batch_size-float": lambda m: freqvi.em(m, GOOD, batch_size=2.5, progress=False),
    "em-m_step-unknown": lambda m: freqvi.em(m, GOOD, m_step="newton", progress=False),
    "fit-num_steps-0": lambda m: freqvi.fit(m, GOOD, num_steps=0, progress=False),
    "fit-lr-0": lambda m: freqvi.fit(m, GOOD, lr=0.0, progress=False),
    "fit-loss-unknown": lambda m: freqvi.fit(m, GOOD, loss="iwae2", progress=False),
    "fit-optim-unknown": lambda m: freqvi.fit(m, GOOD, optim="lbfgs", progress=False),
    "fit-batch_size-too-big": lambda m: freqvi.fit(m, GOOD, batch_size=100, progress=False),
    "fit-clip_norm-negative": lambda m: freqvi.fit(m, GOOD, clip_norm=-1.0, progress=False),
    "fit-max_retries-negative": lambda m: freqvi.fit(m, GOOD, max_retries=-1, progress=False),
    "log_likelihood-num_samples-0": lambda m: freqvi.log_likelihood(m, GOOD, num_samples=0),
    "log_likelihood-method-unknown": lambda m: freqvi.log_likelihood(m, GOOD, method="laplace"),
    "information-method-unknown": lambda m: freqvi.observed_information(m, GOOD, method="fisher"),
    "bootstrap-replicates-1": lambda m: freqvi.bootstrap(m, GOOD, num_replicates=1),
    "bootstrap-kind-unknown": lambda m: freqvi.bootstrap(m, GOOD, kind="jackknife"),
    "guide-not-callable": lambda m: freqvi.fit(m.model, GOOD, 3, progress=False),
    "guide-sites-mismatch": lambda m: freqvi.fit(FactorAnalysis(3, 1).model, GOOD, lambda x: None,
                                                 progress=False),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_a_freqvi_error(case):
    model = GaussianMixture(2, 3, "diag")
    with pytest.raises(FreqviError) as caught:
        BAD_OPTIONS[case](model)
    assert str(caught.value)
    if case.startswith("em"):
        assert not model.initialized  # refused before the model touched the data


def test_non_finite_data_never_becomes_a_silent_nan():
    x = torch.as_tensor(nan_data())
    with pytest.raises(FreqviError, match="non-finite"):
        freqvi.em(GaussianMixture(2, 3), x, progress=False)


@pytest.mark.parametrize("init_scale", [torch.ones(3), 0.0, -1.0, float("nan"), "1"])
def test_a_guide_with_a_bad_initial_scale_is_refused_when_built(init_scale):
    """As AmortizedNormal's is: passing the data where the scale goes (``LocalMeanField(model, x)``) used to
    fail at the fit's first run of the pair, inside torch.full."""
    model = FactorAnalysis(3, 1).model
    for guide in (LocalMeanField, AmortizedNormal):
        with pytest.raises(FreqviError, match="init_scale must be a finite number > 0"):
            guide(model, init_scale=init_scale)

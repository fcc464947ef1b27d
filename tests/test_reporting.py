"""freqvi.reporting: the numbers of a report with their units and standard errors, and what k-hat says."""

import math
import warnings

import numpy as np
import pytest
import torch

import freqvi
from freqvi.infer.log_likelihood import LogLikelihood
from freqvi.models import FactorAnalysis
from freqvi.reporting import held_out, importance_estimate, pareto_k_text, with_errors


def test_held_out_against_numpy():
    values = np.random.default_rng(1).normal(-20.0, 3.0, size=40)
    entry = held_out(float(values.sum()), 2.0, torch.tensor(values), 40)
    assert entry["mean_per_observation"] == pytest.approx(values.mean())
    assert entry["monte_carlo_standard_error_total"] == 2.0
    assert entry["monte_carlo_standard_error_per_observation"] == pytest.approx(2.0 / 40)
    expected = values.std(ddof=1) / math.sqrt(40)
    assert entry["sampling_standard_error_per_observation"] == pytest.approx(expected)
    assert "sampling_standard_error_per_observation" not in held_out(1.0, 0.0, None, 5)


def test_with_errors_names_each_kind():
    text = with_errors(-16.5471, "nats per image",
                       [("Monte-Carlo", 0.0091), ("over the 297 test images", 0.3)])
    assert text == "-16.547 nats per image (Monte-Carlo s.e. 0.009; s.e. 0.300 over the 297 test images)"
    assert with_errors(1.0, "nats", [("Monte-Carlo", math.nan)]) == "1.000 nats"


def _entry(pareto_k) -> dict:
    pareto_k = np.asarray(pareto_k, dtype=float)
    n = len(pareto_k)
    result = LogLikelihood(-10.0 * n, torch.full((n,), -10.0), 0.1, pareto_k, "importance", 100,
                           proposal="student-t(df=3)")
    return importance_estimate(result, n)


def test_pareto_k_text_says_what_the_flag_means():
    flagged = pareto_k_text(_entry([0.2, 0.9, math.nan, 0.5]), "image")
    assert flagged.startswith("PSIS k-hat above 0.7 for 25.0% of images (max 0.90)")
    assert "likely too low" in flagged and flagged.endswith("k-hat not estimable for 25.0% of images (tied "
                                                            "or too few weights)")
    clean = pareto_k_text(_entry([0.2, 0.5]), "image")
    assert clean.startswith("PSIS k-hat at most 0.7 for every image (max 0.50)") and "trusted" in clean
    partly = pareto_k_text(_entry([0.2, math.nan]))
    assert partly.startswith("PSIS k-hat at most 0.7 for every observation where it could be estimated")


def test_pareto_k_text_on_real_estimates_that_k_hat_cannot_judge():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    model = FactorAnalysis(3, 1)
    freqvi.em(model, x, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", freqvi.errors.FreqviWarning)
        few = freqvi.log_likelihood(model, x, method="importance", num_samples=10, seed=0)  # K <= 20
        exact = freqvi.log_likelihood(model, x, method="importance", num_samples=50, seed=0, proposal="guide")
    text = pareto_k_text(importance_estimate(few, 30))
    assert text.startswith("PSIS k-hat could not be estimated for any observation") and "trusted" in text
    assert "errors can be trusted" not in text  # no verdict without k-hat
    # factor analysis's guide is its exact posterior: every weight is the same
    assert pareto_k_text(importance_estimate(exact, 30)).startswith("constant importance weights")

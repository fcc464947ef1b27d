"""Every applicable estimator on every model/guide pair, in freqvi.fit and in plain pyro SVI."""

import math

import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from simulate import factor_data, mixture_data

import freqvi
from freqvi.errors import FreqviInputError
from freqvi.estimators import ESTIMATORS, get_estimator
from freqvi.models import FactorAnalysis, GaussianMixture


def gmm(guide):
    model = GaussianMixture(3, 2)
    return model, {"exact": model.guide, "mean_field": model.mean_field_guide(),
                   "marginal": model.marginal_guide}[guide], mixture_data(n=60)


def fa(guide):
    model = FactorAnalysis(5, 2)
    return model, {"exact": model.guide, "mean_field": model.mean_field_guide()}[guide], factor_data(n=60)


PAIRS = {
    "gmm-exact": lambda: gmm("exact"),
    "gmm-mean_field": lambda: gmm("mean_field"),
    "gmm-marginal": lambda: gmm("marginal"),
    "fa-exact": lambda: fa("exact"),
    "fa-mean_field": lambda: fa("mean_field"),
}

# Why a combination does not apply: enumeration in the model needs TraceEnum_ELBO or the
# Q-function; RenyiELBO and TraceMeanField_ELBO need reparameterisable guide sites (a
# categorical is not).
# The diffusion estimators read closed forms off a diffusion pair (tests/test_diffusion.py runs them
# there, and checks that other pairs are refused).
DIFFUSION_ONLY = ("time_subsampled", "simple")
NOT_APPLICABLE = {
    ("gmm-marginal", name) for name in ("trace", "mean_field", "trace_graph", "renyi")
} | {(pair, name) for pair in ("gmm-exact", "gmm-mean_field") for name in ("renyi", "mean_field")} | {
    (pair, name) for pair in PAIRS for name in DIFFUSION_ONLY}
APPLICABLE = [(p, n) for p in sorted(PAIRS) for n in sorted(ESTIMATORS) if (p, n) not in NOT_APPLICABLE]

OPTIONS = {
    "enum": {"max_plate_nesting": 1, "strict_enumeration_warning": False},
    "q_function": {"max_plate_nesting": 1},
    "renyi": {"alpha": 0.5},
}


@pytest.mark.filterwarnings("ignore:(?s).*you need to use TraceEnum_ELBO:UserWarning")
@pytest.mark.parametrize(("pair", "name"), APPLICABLE)
def test_every_estimator_runs_on_every_model(pair, name):
    owner, guide, x = PAIRS[pair]()
    result = freqvi.fit(owner.model, x, guide, loss=name, num_steps=3, lr=0.01, progress=False,
                        **OPTIONS.get(name, {}))
    assert len(result.elbo) == 3 and all(math.isfinite(v) for v in result.elbo)
    before = {k: v.clone() for k, v in owner.estimates().items()}
    svi = SVI(owner.model, guide, Adam({"lr": 0.01}), get_estimator(name, **OPTIONS.get(name, {})))
    assert math.isfinite(svi.step(x))
    assert any(not torch.equal(before[k], v) for k, v in owner.estimates().items())


def test_matrix_covers_every_model_and_estimator():
    assert {p for p, _ in APPLICABLE} == set(PAIRS)
    assert {n for _, n in APPLICABLE} == set(ESTIMATORS) - set(DIFFUSION_ONLY)


def test_unknown_estimator_name_is_a_clear_error():
    with pytest.raises(FreqviInputError, match="unknown estimator 'iwae2'"):
        get_estimator("iwae2")


def test_class_names_are_accepted():
    assert type(get_estimator("TraceMeanField_ELBO")) is ESTIMATORS["mean_field"]

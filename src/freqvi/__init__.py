"""freqvi: maximum-likelihood estimation of latent variable models on Pyro.

EM, variational EM, amortised VI, VAEs and diffusion models are one method:
maximise the ELBO of a model/guide pair over the model's parameters theta,
and over the guide's as the E-step.
"""

import importlib

from freqvi import datasets, errors, estimators, guides, infer, models
from freqvi.infer import (
    Bootstrap,
    EMResult,
    FitResult,
    GradientMoments,
    Information,
    InformationCriteria,
    LogLikelihood,
    MLEResult,
    bootstrap,
    compare,
    em,
    fit,
    gradient_variance,
    information_criteria,
    log_likelihood,
    maximize_likelihood,
    observed_information,
)
from freqvi.infer.averaging import EMA, Polyak
from freqvi.infer.evaluation import AmortizationGap, ELBOTerms, amortization_gap, elbo_terms
from freqvi.validation import with_missing

__version__ = "0.1.0"

# plots imports matplotlib (a third of a second): loaded on first use, as freqvi.plots.
_LAZY_SUBMODULES = ("plots",)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"freqvi.{name}")
    raise AttributeError(f"module 'freqvi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__all__ = [
    "EMA",
    "AmortizationGap",
    "Bootstrap",
    "ELBOTerms",
    "EMResult",
    "FitResult",
    "GradientMoments",
    "Information",
    "InformationCriteria",
    "LogLikelihood",
    "MLEResult",
    "Polyak",
    "amortization_gap",
    "bootstrap",
    "compare",
    "datasets",
    "elbo_terms",
    "em",
    "errors",
    "estimators",
    "fit",
    "gradient_variance",
    "guides",
    "infer",
    "information_criteria",
    "log_likelihood",
    "maximize_likelihood",
    "models",
    "observed_information",
    "plots",
    "with_missing",
]

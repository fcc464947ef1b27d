"""freqvi: maximum-likelihood estimation of latent variable models on Pyro.

EM, variational EM, amortised VI, VAEs and diffusion models are one method:
maximise the ELBO of a model/guide pair over the model's parameters theta,
and over the guide's as the E-step.
"""

from freqvi import estimators, guides, models
from freqvi.infer import (
    Bootstrap,
    EMResult,
    FitResult,
    Information,
    InformationCriteria,
    LogLikelihood,
    MLEResult,
    bootstrap,
    compare,
    em,
    fit,
    information_criteria,
    log_likelihood,
    maximize_likelihood,
    observed_information,
)
from freqvi.infer.evaluation import AmortizationGap, ELBOTerms, amortization_gap, elbo_terms

__version__ = "0.1.0"

__all__ = [
    "AmortizationGap",
    "Bootstrap",
    "ELBOTerms",
    "EMResult",
    "FitResult",
    "Information",
    "InformationCriteria",
    "LogLikelihood",
    "MLEResult",
    "amortization_gap",
    "bootstrap",
    "compare",
    "elbo_terms",
    "em",
    "estimators",
    "fit",
    "guides",
    "information_criteria",
    "log_likelihood",
    "maximize_likelihood",
    "models",
    "observed_information",
]

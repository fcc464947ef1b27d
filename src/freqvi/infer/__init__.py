"""Drivers: the loops that fit a model/guide pair and measure the fit."""

from freqvi.infer.bootstrap import Bootstrap, bootstrap
from freqvi.infer.em import EMResult, em
from freqvi.infer.fit import FitResult, fit
from freqvi.infer.gradient_noise import GradientMoments, gradient_variance
from freqvi.infer.information import Information, observed_information
from freqvi.infer.log_likelihood import LogLikelihood, log_likelihood
from freqvi.infer.maximize_likelihood import MLEResult, maximize_likelihood
from freqvi.infer.model_choice import InformationCriteria, compare, information_criteria

__all__ = [
    "Bootstrap",
    "EMResult",
    "FitResult",
    "GradientMoments",
    "Information",
    "InformationCriteria",
    "LogLikelihood",
    "MLEResult",
    "bootstrap",
    "compare",
    "em",
    "fit",
    "gradient_variance",
    "information_criteria",
    "log_likelihood",
    "maximize_likelihood",
    "observed_information",
]

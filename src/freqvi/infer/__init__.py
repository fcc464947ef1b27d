"""Drivers: the loops that fit a model/guide pair and measure the fit."""

from freqvi.infer.em import EMResult, em
from freqvi.infer.fit import FitResult, fit
from freqvi.infer.information import Information, observed_information
from freqvi.infer.log_likelihood import LogLikelihood, log_likelihood
from freqvi.infer.model_choice import InformationCriteria, compare, information_criteria

__all__ = [
    "EMResult",
    "FitResult",
    "Information",
    "InformationCriteria",
    "LogLikelihood",
    "compare",
    "em",
    "fit",
    "information_criteria",
    "log_likelihood",
    "observed_information",
]

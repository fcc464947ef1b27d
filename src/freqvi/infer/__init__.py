"""Drivers: the loops that fit a model/guide pair and measure the fit."""

from freqvi.infer.em import EMResult, em
from freqvi.infer.fit import FitResult, fit
from freqvi.infer.log_likelihood import LogLikelihood, log_likelihood

__all__ = ["EMResult", "FitResult", "LogLikelihood", "em", "fit", "log_likelihood"]

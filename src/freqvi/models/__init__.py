"""Built-in models, each a :class:`~pyro.nn.PyroModule` with ``model`` and guides."""

from freqvi.models.base import ClosedFormMStep, LatentVariableModel
from freqvi.models.factor_analysis import FactorAnalysis
from freqvi.models.gaussian_mixture import GaussianMixture
from freqvi.models.random_intercept_logistic import RandomInterceptLogistic

__all__ = ["ClosedFormMStep", "FactorAnalysis", "GaussianMixture", "LatentVariableModel",
           "RandomInterceptLogistic"]

"""ELBO estimators: Pyro's own by short name, and the ones freqvi adds.

Each is a :class:`pyro.infer.ELBO`, so it works in :func:`freqvi.fit` and in a
plain :class:`pyro.infer.SVI` alike.
"""

from pyro.infer import (
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)

from freqvi.estimators.diagnostics import GradientMoments, gradient_variance
from freqvi.estimators.diffusion import DiffusionObjective, ForwardProcess, ReverseProcess
from freqvi.estimators.dreg import DReG_ELBO
from freqvi.estimators.iwae import IWAE_ELBO
from freqvi.estimators.noise_prediction import NoisePredictionLoss
from freqvi.estimators.q_function import QFunctionELBO
from freqvi.estimators.registry import ESTIMATORS, get_estimator
from freqvi.estimators.stl import STL_ELBO
from freqvi.estimators.time_subsampled import TimeSubsampledELBO

__all__ = [
    "ESTIMATORS",
    "IWAE_ELBO",
    "STL_ELBO",
    "DReG_ELBO",
    "DiffusionObjective",
    "ForwardProcess",
    "GradientMoments",
    "NoisePredictionLoss",
    "QFunctionELBO",
    "RenyiELBO",
    "ReverseProcess",
    "TimeSubsampledELBO",
    "TraceEnum_ELBO",
    "TraceGraph_ELBO",
    "TraceMeanField_ELBO",
    "Trace_ELBO",
    "get_estimator",
    "gradient_variance",
]

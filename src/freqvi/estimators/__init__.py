"""ELBO estimators: Pyro's own by short name, and the ones freqvi adds.

Each is a :class:`pyro.infer.ELBO`, so it works in :func:`freqvi.fit` and in a
plain :class:`pyro.infer.SVI` alike. The driver that measures an estimator's gradient
noise on a model, :func:`freqvi.gradient_variance`, lives with the drivers; its old names
here, ``gradient_variance`` and ``GradientMoments``, still work.
"""

import importlib

from pyro.infer import (
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)

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
]


def __getattr__(name: str):
    """The old names of the gradient-noise driver, moved to the drivers' layer (:mod:`freqvi.infer`), where
    the thread policy and the data plate are; looked up on use, so this layer imports nothing above it."""
    if name in ("gradient_variance", "GradientMoments"):
        return getattr(importlib.import_module("freqvi.infer.gradient_noise"), name)
    raise AttributeError(f"module 'freqvi.estimators' has no attribute {name!r}")

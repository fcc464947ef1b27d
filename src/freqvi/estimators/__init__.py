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

from freqvi.estimators.q_function import QFunctionELBO
from freqvi.estimators.registry import ESTIMATORS, get_estimator

__all__ = [
    "ESTIMATORS",
    "QFunctionELBO",
    "RenyiELBO",
    "TraceEnum_ELBO",
    "TraceGraph_ELBO",
    "TraceMeanField_ELBO",
    "Trace_ELBO",
    "get_estimator",
]

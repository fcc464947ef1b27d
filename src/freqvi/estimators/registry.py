"""Short names for the ELBO estimators, so a driver takes ``loss="iwae"`` or an instance."""

from __future__ import annotations

from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)

from freqvi.errors import FreqviInputError
from freqvi.estimators.dreg import DReG_ELBO
from freqvi.estimators.iwae import IWAE_ELBO
from freqvi.estimators.noise_prediction import NoisePredictionLoss
from freqvi.estimators.q_function import QFunctionELBO
from freqvi.estimators.stl import STL_ELBO
from freqvi.estimators.time_subsampled import TimeSubsampledELBO

ESTIMATORS: dict[str, type[ELBO]] = {
    "trace": Trace_ELBO,
    "mean_field": TraceMeanField_ELBO,
    "trace_graph": TraceGraph_ELBO,
    "enum": TraceEnum_ELBO,
    "renyi": RenyiELBO,
    "q_function": QFunctionELBO,
    "iwae": IWAE_ELBO,
    "dreg": DReG_ELBO,
    "stl": STL_ELBO,
    "time_subsampled": TimeSubsampledELBO,
    "simple": NoisePredictionLoss,
}
"""Short name -> estimator class. Class names (``"Trace_ELBO"``) are accepted too."""


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_")


_BY_CLASS_NAME = {_canonical(cls.__name__): key for key, cls in ESTIMATORS.items()}


def get_estimator(loss: str | ELBO = "trace", **options) -> ELBO:
    """Returns an ELBO estimator: ``loss`` itself if it is one, else a new one by name.

    :param loss: an :class:`~pyro.infer.ELBO` instance, or one of
        ``ESTIMATORS``' keys or class names (case-insensitive).
    :param options: keyword arguments for the estimator's constructor
        (``num_particles``, ``max_plate_nesting``, ...); only with a name.
    """
    if isinstance(loss, ELBO):
        if options:
            raise FreqviInputError(
                f"estimator options {sorted(options)} can only be given with an estimator name; "
                "set them on the ELBO instance instead."
            )
        return loss
    if isinstance(loss, type) and issubclass(loss, ELBO):
        return loss(**options)
    key = _canonical(loss) if isinstance(loss, str) else None
    key = _BY_CLASS_NAME.get(key, key)
    if key not in ESTIMATORS:
        raise FreqviInputError(
            f"unknown estimator {loss!r}; use a pyro.infer.ELBO instance or one of "
            f"{sorted(ESTIMATORS)}."
        )
    return ESTIMATORS[key](**options)

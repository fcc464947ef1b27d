"""Short names for the ELBO estimators, so a driver takes ``loss="iwae"`` or an instance."""

from __future__ import annotations

import inspect

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


def get_estimator(loss: str | ELBO = "trace", *, plate_name: str | None = None,
                  plate_nesting: int | None = None, **options) -> ELBO:
    """Returns an ELBO estimator: ``loss`` itself if it is one, else a new one by name.

    A driver passes what it knows of the model, so that an estimator built by name
    agrees with it: ``plate_name`` (its ``data_plate_name``) goes as ``data_plate`` to
    every estimator whose constructor takes one (IWAE, DReG, STL, which sum over that
    plate's observations), and ``plate_nesting`` (counted on the checked traces) as
    ``max_plate_nesting`` to every one that takes it, unless ``options`` give it, so
    that Pyro neither guesses it nor logs its guess.

    :param loss: an :class:`~pyro.infer.ELBO` instance, or one of
        ``ESTIMATORS``' keys or class names (case-insensitive).
    :param plate_name: the driver's plate over observations, or ``None``.
    :param plate_nesting: the plates the model and guide nest, or ``None``.
    :param options: keyword arguments for the estimator's constructor
        (``num_particles``, ``max_plate_nesting``, ...); only with a name.
    :raises FreqviInputError: for an unknown name, options with an instance, or an
        instance or option whose data plate is not the driver's.
    """
    if isinstance(loss, ELBO):
        if options:
            raise FreqviInputError(
                f"estimator options {sorted(options)} can only be given with an estimator name; "
                "set them on the ELBO instance instead."
            )
        _check_plate(getattr(loss, "data_plate", None), plate_name, f"the {type(loss).__name__} given")
        return loss
    if isinstance(loss, type) and issubclass(loss, ELBO):
        cls = loss
    else:
        key = _canonical(loss) if isinstance(loss, str) else None
        key = _BY_CLASS_NAME.get(key, key)
        if key not in ESTIMATORS:
            raise FreqviInputError(
                f"unknown estimator {loss!r}; use a pyro.infer.ELBO instance or one of "
                f"{sorted(ESTIMATORS)}."
            )
        cls = ESTIMATORS[key]
    accepted = inspect.signature(cls).parameters
    if plate_name is not None and "data_plate" in accepted:
        _check_plate(options.get("data_plate"), plate_name, f"the loss option data_plate of {cls.__name__}")
        options["data_plate"] = plate_name
    if plate_nesting is not None and "max_plate_nesting" in accepted:
        options.setdefault("max_plate_nesting", plate_nesting)
    return cls(**options)


def _check_plate(estimator_plate: str | None, driver_plate: str | None, what: str) -> None:
    """Raises if an estimator would sum over another plate than the driver's data plate."""
    if None not in (estimator_plate, driver_plate) and estimator_plate != driver_plate:
        raise FreqviInputError(
            f"{what} treats the plate {estimator_plate!r} as the observations, but the driver's "
            f"data_plate_name is {driver_plate!r}; build the estimator with data_plate={driver_plate!r} "
            "or pass it by name (loss='iwae'), which takes the driver's plate."
        )

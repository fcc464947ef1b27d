"""Short names for the ELBO estimators, so a driver takes ``loss="iwae"`` or an instance."""

from __future__ import annotations

import inspect

import numpy as np
from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)

from freqvi.errors import FreqviError, FreqviInputError
from freqvi.estimators.dreg import DReG_ELBO
from freqvi.estimators.iwae import IWAE_ELBO
from freqvi.estimators.noise_prediction import NoisePredictionLoss
from freqvi.estimators.q_function import QFunctionELBO
from freqvi.estimators.stl import STL_ELBO
from freqvi.estimators.time_subsampled import TimeSubsampledELBO
from freqvi.validation import check_positive_int

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
    :raises FreqviInputError: for an unknown name, options with an instance, an option the
        estimator does not take or whose value its constructor refuses, ``num_particles`` below 1
        (in the options or on the instance), or an instance or option whose data plate is not
        the driver's.
    """
    if isinstance(loss, ELBO):
        if options:
            raise FreqviInputError(
                f"estimator options {sorted(options)} can only be given with an estimator name; "
                "set them on the ELBO instance instead."
            )
        _check_plate(getattr(loss, "data_plate", None), plate_name, f"the {type(loss).__name__} given")
        check_positive_int(getattr(loss, "num_particles", 1), f"the {type(loss).__name__}'s num_particles")
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
    accepted = _options_of(cls, options)
    if plate_name is not None and "data_plate" in accepted:
        _check_plate(options.get("data_plate"), plate_name, f"the loss option data_plate of {cls.__name__}")
        options["data_plate"] = plate_name
    if plate_nesting is not None and "max_plate_nesting" in accepted:
        options.setdefault("max_plate_nesting", plate_nesting)
    try:
        return cls(**options)
    except FreqviError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:  # a value the constructor refuses, in its words
        raise FreqviInputError(f"{cls.__name__} cannot be built with the options {options}: "
                               f"{type(exc).__name__}: {exc}") from None


def _options_of(cls: type[ELBO], options: dict) -> dict[str, inspect.Parameter]:
    """The constructor's parameters, after refusing ``options`` it does not take, a ``num_particles``
    that is not a positive integer (Pyro's estimators take 0 and return an ELBO of 0), and a value of
    another kind than its default (a string for a number, a number for a flag)."""
    accepted = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [] if takes_any else sorted(set(options) - set(accepted))
    if unknown:
        named = sorted(k for k, p in accepted.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        raise FreqviInputError(f"{cls.__name__} takes no option {unknown}; its options are {named}.")
    if "num_particles" in options:
        options["num_particles"] = check_positive_int(options["num_particles"], "num_particles")
    for name, value in options.items():  # a value of another kind than the default's fails only in a step
        default = accepted[name].default if name in accepted else inspect.Parameter.empty
        if isinstance(default, bool) and not isinstance(value, bool | np.bool_):
            raise FreqviInputError(f"{cls.__name__}'s option {name} must be True or False; got {value!r}.")
        real = isinstance(value, int | float | np.number) and not isinstance(value, bool | complex)
        if isinstance(default, int | float) and not isinstance(default, bool) and not real:
            raise FreqviInputError(f"{cls.__name__}'s option {name} must be a real number; got {value!r}.")
    return accepted


def _check_plate(estimator_plate: str | None, driver_plate: str | None, what: str) -> None:
    """Raises if an estimator would sum over another plate than the driver's data plate."""
    if None not in (estimator_plate, driver_plate) and estimator_plate != driver_plate:
        raise FreqviInputError(
            f"{what} treats the plate {estimator_plate!r} as the observations, but the driver's "
            f"data_plate_name is {driver_plate!r}; build the estimator with data_plate={driver_plate!r} "
            "or pass it by name (loss='iwae'), which takes the driver's plate."
        )

"""Turning what the user passed into a (model, guide) pair of callables, and its first run on the data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro.poutine.trace_struct import Trace

from freqvi.errors import FreqviInputError
from freqvi.models.base import LatentVariableModel
from freqvi.traces import check_model, check_pair, data_plate


@dataclass(frozen=True)
class Pair:
    """A model, its guide (``None`` where a driver needs none) and the object owning them.

    ``owner`` is the built-in model the functions belong to, if any: drivers ask
    it for optional extras (an exact ``log_marginal``, a closed-form M-step).
    """

    model: Callable
    guide: Callable | None
    owner: object | None


def resolve_pair(model, guide=None, require_guide: bool = True) -> Pair:
    """Accepts a freqvi model, a ``(model, guide)`` tuple, or a model callable and a guide.

    A freqvi model supplies its exact-posterior ``guide`` unless another is given.
    """
    if isinstance(model, tuple | list):
        if len(model) != 2 or guide is not None:
            raise FreqviInputError(
                "pass either a (model, guide) pair or a model and guide=..., not both."
            )
        model, guide = model
    owner = model if isinstance(model, LatentVariableModel) else getattr(model, "__self__", None)
    if isinstance(model, LatentVariableModel):
        guide = model.guide if guide is None else guide
        model = model.model
    if not callable(model):
        raise FreqviInputError(f"the model must be callable; got {type(model).__name__}.")
    if guide is None and require_guide:
        raise FreqviInputError(
            "this driver needs a guide: pass guide=... (a callable taking the same data as the "
            "model), or a freqvi model, which brings its own."
        )
    if guide is not None and not callable(guide):
        raise FreqviInputError(f"the guide must be callable; got {type(guide).__name__}.")
    return Pair(model, guide, owner if isinstance(owner, LatentVariableModel) else None)


def first_run(pair: Pair, data: tuple[torch.Tensor, ...], seed: int | None,
              data_plate_name: str) -> tuple[Trace, Trace | None, object]:
    """The evaluation drivers' start, after their own checks: seeds Pyro's generators (``seed``, if
    given), runs the pair once on ``data`` (:func:`~freqvi.traces.check_pair`, or
    :func:`~freqvi.traces.check_model` without a guide) and finds the data plate over ``data``'s
    rows (:func:`~freqvi.traces.data_plate`). Returns the model's trace, the guide's (or ``None``)
    and the plate's frame.

    :raises FreqviInputError: where the pair cannot run on ``data`` or lacks the data plate.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    if pair.guide is None:
        model_trace, guide_trace = check_model(pair.model, data), None
    else:
        model_trace, guide_trace = check_pair(pair.model, pair.guide, data)
    return model_trace, guide_trace, data_plate(model_trace, data_plate_name, data[0].shape[0])

"""Checks at the boundary: data and options are validated before any work.

Each function raises :class:`~freqvi.errors.FreqviInputError` with a message
that says what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from freqvi.errors import FreqviInputError

Data = torch.Tensor | tuple[torch.Tensor, ...]


def as_tensor(x, name: str = "data") -> torch.Tensor:
    """Converts an array-like to a floating tensor, keeping float64 as float64.

    Precision follows the data: float64 input stays float64, every other
    numeric input becomes float32 (PyTorch's default).
    """
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise FreqviInputError(
                f"{name} must be a tensor or an array of numbers; got {type(x).__name__} ({exc})."
            ) from None
    if t.dtype == torch.bool or not (t.is_floating_point() or _is_integer(t)):
        raise FreqviInputError(f"{name} must hold real numbers; got dtype {t.dtype}.")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.get_default_dtype())
    return t


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def as_data(data, name: str = "data") -> tuple[torch.Tensor, ...]:
    """Normalises ``data`` (one array or a tuple of arrays) to a tuple of tensors.

    All tensors must share their first dimension, the number of observations,
    and be finite.
    """
    items = data if isinstance(data, tuple | list) else (data,)
    if len(items) == 0:
        raise FreqviInputError(f"{name} is empty; pass at least one array of observations.")
    tensors = tuple(as_tensor(x, f"{name}[{i}]" if len(items) > 1 else name)
                    for i, x in enumerate(items))
    for i, t in enumerate(tensors):
        label = f"{name}[{i}]" if len(tensors) > 1 else name
        if t.dim() == 0:
            raise FreqviInputError(
                f"{label} must have a first dimension indexing observations; got a scalar."
            )
        check_finite(t, label)
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) > 1:
        raise FreqviInputError(
            f"all arrays in {name} must have the same number of rows (observations); "
            f"got {[t.shape[0] for t in tensors]}."
        )
    if tensors[0].shape[0] == 0:
        raise FreqviInputError(f"{name} has no observations (0 rows).")
    return tensors


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raises if ``t`` holds NaN or infinite values, saying where the first one is."""
    bad = ~torch.isfinite(t)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        kind = "NaN" if torch.isnan(t[first]) else "infinite"
        raise FreqviInputError(
            f"{name} holds {int(bad.sum())} non-finite value(s) (first: {kind} at index {first}); "
            "remove or impute them before fitting."
        )


def check_matrix(x: torch.Tensor, dim: int, name: str = "data") -> None:
    """Raises unless ``x`` has shape ``(n, dim)``."""
    if x.dim() != 2 or x.shape[-1] != dim:
        raise FreqviInputError(
            f"{name} must have shape (n_observations, {dim}); got {tuple(x.shape)}."
        )


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """Raises unless ``value`` is an integer >= ``minimum``; returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise FreqviInputError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def check_positive_float(value, name: str, allow_zero: bool = False) -> float:
    """Raises unless ``value`` is a finite real number > 0 (or >= 0)."""
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise FreqviInputError(f"{name} must be a finite number {bound}; got {value!r}.")
    return float(value)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """Raises unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise FreqviInputError(f"{name} must be one of {list(choices)}; got {value!r}.")
    return value

"""Checks at the boundary: data and options are validated before any work.

Each function raises :class:`~freqvi.errors.FreqviInputError` with a message
that says what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.infer.util import is_validation_enabled

from freqvi.errors import FreqviInputError

Data = torch.Tensor | tuple[torch.Tensor, ...]

#: Floating dtypes kept as given; half precisions become the default dtype (too coarse for log-densities).
_KEPT_FLOATS = (torch.float32, torch.float64)


@dataclass(frozen=True)
class WithMissing:
    """An array (or an iterable of batches) whose NaN cells are missing values the model itself handles.

    Made by :func:`freqvi.with_missing`; every driver unwraps it where it checks its data.
    """

    data: object


def with_missing(data) -> WithMissing:
    r"""Marks ``data``'s NaN cells as missing values that the model masks, so drivers let them through.

    Drivers refuse non-finite data by default. A model that handles missing values
    itself (Pyro's ``obs_mask=``, ``poutine.mask`` or ``Distribution.mask`` on
    ``~torch.isnan(x)``, the NaN replaced by any finite number where the
    log-density is computed, e.g. ``x.nan_to_num()``, since a NaN times a zero mask
    still poisons the gradient) maximises the likelihood of the observed cells,
    :math:`\sum_i \log p(x_{i,\mathrm{obs}}; \theta)`. Pass ``with_missing(x)`` wherever
    ``x`` goes (alone, inside a tuple of arrays, or around an iterable of batches):
    NaN cells then pass; infinite values are still refused.

    :param data: an array, a tensor or an iterable of batches.
    :returns: the marked data, for any driver's ``data=``.
    """
    if isinstance(data, WithMissing):
        return data
    return WithMissing(data)


class CheckedData(tuple):
    """The tuple of tensors :func:`as_data` returns, remembering whether it let NaN cells through.

    A driver that hands its data to another (``information_criteria`` to
    ``log_likelihood``, ``compare`` to ``fit``) passes the permission on with them.
    """

    allow_nan: bool = False


def as_tensor(x, name: str = "data") -> torch.Tensor:
    """Converts an array-like (a tensor, a NumPy array, nested lists of rows) to a tensor, keeping its dtype.

    Floating arrays set the precision (float32 stays float32, float64 stays float64;
    half precisions become the default dtype); boolean and integer arrays (masks,
    index arrays, counts) pass through unchanged, as Pyro takes them. Values are not
    checked here (:func:`as_data` checks floating arrays for finiteness).

    :raises FreqviInputError: if ``x`` is not an array of numbers (strings, ragged
        lists, complex numbers, ``None``).
    """
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise FreqviInputError(
                f"{name} must be a tensor or an array of numbers; got {type(x).__name__} ({exc})."
            ) from None
    if t.is_complex():
        raise FreqviInputError(f"{name} must hold real numbers; got dtype {t.dtype}.")
    if t.is_floating_point() and t.dtype not in _KEPT_FLOATS:
        t = t.to(torch.get_default_dtype())
    return t


def as_real(x, name: str = "data") -> torch.Tensor:
    """:func:`as_tensor` for quantities that are real numbers (a design matrix, a built-in model's data).

    Integer arrays become the default floating dtype; booleans are refused.
    """
    t = as_tensor(x, name)
    if t.dtype == torch.bool:
        raise FreqviInputError(f"{name} must hold real numbers; got booleans (dtype {t.dtype}).")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def as_data(data, name: str = "data") -> CheckedData:
    """Normalises ``data`` to the tuple of tensors passed to model and guide.

    A tuple is several arrays (the model's positional arguments); anything else (a
    tensor, a NumPy array, a list of rows) is one array. Each keeps its dtype
    (:func:`as_tensor`). All must share their first dimension, the number of
    observations. Floating arrays must be finite, except for NaN cells of an array
    marked :func:`with_missing` (or of a :class:`CheckedData` that allowed them).

    :raises FreqviInputError: for a callable (a model or guide in the data's place), an
        empty tuple, a scalar, unequal row counts, no rows, or non-finite values.
    """
    check_not_callable(data, name)
    missing = isinstance(data, WithMissing) or getattr(data, "allow_nan", False)
    data = data.data if isinstance(data, WithMissing) else data
    items = data if isinstance(data, tuple) else (data,)
    if len(items) == 0:
        raise FreqviInputError(f"{name} is empty; pass at least one array of observations.")
    tensors, marks = [], []
    for i, item in enumerate(items):
        label = f"{name}[{i}]" if len(items) > 1 else name
        marks.append(missing or isinstance(item, WithMissing))
        t = as_tensor(item.data if isinstance(item, WithMissing) else item, label)
        if t.dim() == 0:
            raise FreqviInputError(
                f"{label} must have a first dimension indexing observations; got a scalar."
            )
        if t.is_floating_point():
            check_finite(t, label, allow_nan=marks[-1])
        tensors.append(t)
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) > 1:
        raise FreqviInputError(
            f"all arrays in {name} must have the same number of rows (observations); "
            f"got {[t.shape[0] for t in tensors]}."
        )
    if tensors[0].shape[0] == 0:
        raise FreqviInputError(f"{name} has no observations (0 rows).")
    checked = CheckedData(tensors)
    checked.allow_nan = any(marks)
    return checked


def check_not_callable(data, name: str = "data") -> None:
    """Refuses a model or guide where the data go: every driver takes ``(model, data, guide=None)``."""
    if callable(data):
        found = getattr(data, "__name__", type(data).__name__)
        raise FreqviInputError(
            f"{name} must be arrays (or an iterable of batches); got a callable, {found}. Every driver "
            "takes (model, data, guide=None): pass the data second and the guide third, or by keyword "
            "(data=..., guide=...)."
        )


def check_finite(t: torch.Tensor, name: str, allow_nan: bool = False, advice: str | None = None) -> None:
    """Raises if ``t`` holds NaN (unless ``allow_nan``) or infinite values, saying where the first one is
    and what to do (``advice``, or how to remove them or mark them missing)."""
    bad = torch.isinf(t) if allow_nan else ~torch.isfinite(t)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        kind = "NaN" if torch.isnan(t[first]) else "infinite"
        if advice is None:
            advice = ("infinite values are not missing values; remove them" if allow_nan else
                      "remove or impute them before fitting, or, if the model masks missing values itself, "
                      "mark the NaN cells missing with freqvi.with_missing(data)")
        raise FreqviInputError(
            f"{name} holds {int(bad.sum())} non-finite value(s) (first: {kind} at index {first}); {advice}."
        )


def dtype_note(data: tuple[torch.Tensor, ...]) -> str:
    """A note for an error raised by a model run on ``data``: which arrays reached it as integers or booleans.

    Empty where every array is floating. Such arrays pass unchanged (:func:`as_tensor`), so a
    density over real values (``Bernoulli``, ``Normal``) observing one needs it as floats.
    """
    exact = [f"data[{i}] ({t.dtype})" for i, t in enumerate(data)
             if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    if not exact:
        return ""
    return (f" (note: {', '.join(exact)} reached the model as given; integer and boolean arrays are not "
            "converted, so a density over real values that observes one needs it as floats, e.g. y.float())")


def check_matrix(x: torch.Tensor, dim: int, name: str = "data") -> None:
    """Raises unless ``x`` is a finite floating tensor of shape ``(n, dim)`` (a built-in model's data).

    Finite also where the driver let NaN cells through (:func:`with_missing`): the
    built-in models have no model of missing values. Values are read only while Pyro's
    validation is on (the drivers' check of the pair, not their steps).
    """
    if not x.is_floating_point():
        raise FreqviInputError(
            f"{name} must hold real numbers in a floating dtype; got dtype {x.dtype}. Convert it, "
            "e.g. torch.as_tensor(x, dtype=torch.float64)."
        )
    if x.dim() != 2 or x.shape[-1] != dim:
        raise FreqviInputError(
            f"{name} must have shape (n_observations, {dim}); got {tuple(x.shape)}."
        )
    if is_validation_enabled():
        check_finite(x, name, advice="this model has no model of missing values: remove or impute them")


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


#: Seeds every generator ``pyro.set_rng_seed`` seeds accepts (NumPy's legacy one takes 32 bits).
SEED_RANGE = (0, 2**32 - 1)


def check_seed(seed, name: str = "seed") -> int | None:
    """Raises unless ``seed`` is ``None`` or an integer in ``[0, 2**32 - 1]`` (what Python's, NumPy's and
    torch's generators all accept); returns it as ``int`` (or ``None``)."""
    if seed is None:
        return None
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not low <= seed <= high:
        raise FreqviInputError(f"{name} must be None or an integer in [{low}, 2**32 - 1]; got {seed!r}.")
    return int(seed)


def check_probability(value, name: str) -> float:
    """Raises unless ``value`` is a real number strictly between 0 and 1 (a level, a quantile)."""
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    if not (ok and 0 < value < 1):
        raise FreqviInputError(f"{name} must be a number strictly between 0 and 1; got {value!r}.")
    return float(value)


def check_widths(widths, name: str = "hidden") -> tuple[int, ...]:
    """Raises unless ``widths`` is a sequence of integers >= 1 (a network's hidden layer widths, possibly
    empty); returns them as a tuple."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence):
        raise FreqviInputError(f"{name} must be a sequence of layer widths (integers >= 1), e.g. (128, 64); "
                               f"got {widths!r}.")
    return tuple(check_positive_int(w, f"{name} width") for w in widths)


def check_init(init, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A model's ``init=`` as float64 tensors, checked: a mapping with exactly the keys of ``shapes``,
    each value an array of finite real numbers of its shape.

    Constraints beyond shape and finiteness (positive variances, weights summing to one) are the
    model's to check on the values returned.

    :raises FreqviInputError: for a value that is not a mapping, missing or unknown keys, a value that is
        not an array of real numbers (strings, ragged lists), the wrong shape or non-finite entries.
    """
    if not isinstance(init, Mapping):
        raise FreqviInputError(f"init must be a dict with the keys {sorted(shapes)}; "
                               f"got {type(init).__name__}.")
    if set(init) != set(shapes):
        raise FreqviInputError(f"init must have exactly the keys {sorted(shapes)}; "
                               f"got {sorted(init, key=str)}.")
    checked = {}
    for key, shape in shapes.items():
        label = f"init[{key!r}]"
        value = as_real(init[key], label).to(torch.float64)
        if tuple(value.shape) != tuple(shape):
            raise FreqviInputError(f"{label} must have shape {tuple(shape)}; got {tuple(value.shape)}.")
        check_finite(value, label, advice="starting values must be finite numbers")
        checked[key] = value
    return checked


@contextmanager
def kept_on_refusal(model) -> Iterator[None]:
    """Puts the parameters back as they were, values and dtypes, if the block raises a
    :class:`~freqvi.errors.FreqviInputError`: a refused call leaves the model as it found it, also when
    the refusal comes after the model has run on the data (which moves it to the data's dtype, or
    creates its parameters from the refused data).

    Two places hold parameters. The modules of ``model`` (what a driver was given: a
    ``torch.nn.Module``, a ``(model, guide)`` pair, or a bound method of a module): their parameters and
    buffers are restored; tensors a module created during the block stay. Pyro's parameter store (where
    a plain function's ``pyro.param`` lives): the parameters it held are restored in place, and those
    created during the block, from the refused data, are removed, so that the next call creates them
    afresh (a module's own entries excepted, which stay with their module).
    """
    parts = model if isinstance(model, tuple) else (model,)
    modules = {id(m): m for m in (getattr(p, "__self__", p) for p in parts) if isinstance(m, torch.nn.Module)}
    parameters = [(p, p.detach().clone()) for m in modules.values() for p in m.parameters()]
    buffers = [(m, name, b.clone()) for m in modules.values() for name, b in m.named_buffers()]
    stored = [(name, p, p.detach().clone()) for name, p in pyro.get_param_store().named_parameters()]
    try:
        yield
    except FreqviInputError:
        with torch.no_grad():  # a dtype conversion keeps parameter objects but replaces buffers
            for parameter, value in [*parameters, *((p, v) for _, p, v in stored)]:
                parameter.data = value
            for module, name, value in buffers:
                module.get_buffer(name).data = value
        _remove_new_store_entries({name for name, _, _ in stored}, modules.values())
        raise


def _remove_new_store_entries(kept: set[str], modules) -> None:
    """Deletes the entries of Pyro's parameter store not in ``kept``, except the parameters of ``modules``."""
    owned = {id(p) for m in modules for p in m.parameters()}
    store = pyro.get_param_store()
    for name, unconstrained in list(store.named_parameters()):
        if name not in kept and id(unconstrained) not in owned:
            del store[name]


@contextmanager
def allocation(what: str) -> Iterator[None]:
    """Turns torch's refusal to allocate tensors of the sizes asked for (beyond int64, beyond memory)
    into a :class:`~freqvi.errors.FreqviInputError` naming ``what`` was being built; other errors pass
    unchanged."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        size_error = isinstance(exc, MemoryError | OverflowError) or "verflow" in first or "allocate" in first
        if not size_error:
            raise
        raise FreqviInputError(f"{what} is too large to allocate: {first}") from None

"""Running a model/guide pair on a device: the modules moved once, new tensors created there."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import pyro
import torch

from freqvi.errors import FreqviInputError


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a :class:`torch.device`, checked to exist here; ``None`` stays ``None``."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FreqviInputError(
            f"device must be 'cpu', 'cuda' or 'cuda:<index>'; got {device!r} ({exc})."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FreqviInputError(f"device {str(device)!r} was asked for, but this PyTorch sees no CUDA GPU "
                               "(a CPU build, or no driver); use device='cpu'.")
    if device.type not in ("cpu", "cuda"):
        raise FreqviInputError(f"device must be a CPU or a CUDA device; got {str(device)!r}.")
    return device


def on_device(device: torch.device | None) -> AbstractContextManager:
    """A context in which tensors created without a device land on ``device``.

    A model's constants (``torch.tensor(0.0)``, ``torch.eye(d)``) and its first
    ``pyro.param`` values are then made where the data are. On the CPU, the default,
    nothing is changed (the context costs a little on every torch call).
    """
    return nullcontext() if device is None or device.type == "cpu" else device


def move_to(device: torch.device | None, *objects) -> None:
    """Moves every ``torch.nn.Module`` among ``objects`` (or owning a bound method among them)
    and every parameter already in Pyro's store to ``device``, in place."""
    if device is None:
        return
    for obj in objects:
        owner = getattr(obj, "__self__", obj)
        if isinstance(owner, torch.nn.Module):
            owner.to(device)
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in list(store.keys()):
            unconstrained = store.get_param(name).unconstrained()
            if unconstrained.device != device:
                unconstrained.data = unconstrained.data.to(device)

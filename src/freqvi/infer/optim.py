"""Optimisers by short name."""

from __future__ import annotations

import pyro.optim
from pyro.optim import PyroOptim

from freqvi.errors import FreqviInputError
from freqvi.validation import check_positive_float

OPTIMIZERS = {
    "adam": pyro.optim.Adam,
    "clipped_adam": pyro.optim.ClippedAdam,
    "sgd": pyro.optim.SGD,
    "rmsprop": pyro.optim.RMSprop,
    "adagrad": pyro.optim.Adagrad,
}


def make_optimizer(optim: str | PyroOptim, lr: float) -> PyroOptim:
    """Returns ``optim`` if it is a :class:`~pyro.optim.PyroOptim`, else a new one by name."""
    if isinstance(optim, PyroOptim):
        return optim
    if optim not in OPTIMIZERS:
        raise FreqviInputError(
            f"unknown optimiser {optim!r}; use one of {sorted(OPTIMIZERS)} or a pyro.optim instance."
        )
    return OPTIMIZERS[optim]({"lr": check_positive_float(lr, "lr")})

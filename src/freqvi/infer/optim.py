"""Optimisers by short name: plain torch optimisers over all parameters at once."""

from __future__ import annotations

import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam

from freqvi.errors import FreqviInputError
from freqvi.validation import check_positive_float

#: Short name -> torch optimiser class. One optimiser over every parameter costs less per
#: step than Pyro's wrappers, which keep one optimiser per parameter tensor.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "clipped_adam": ClippedAdam,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def make_optimizer(optim: str | PyroOptim | torch.optim.Optimizer, lr: float,
                   params: list[torch.Tensor]):
    """A torch optimiser over ``params`` by name, or ``optim`` itself if it is already one.

    A :class:`~pyro.optim.PyroOptim` (Pyro's wrapper) is returned as is; it is
    called with the parameters after each backward pass, as Pyro's SVI does.
    """
    if isinstance(optim, PyroOptim | torch.optim.Optimizer):
        return optim
    if not isinstance(optim, str) or optim not in OPTIMIZERS:  # a list or dict is unhashable: refuse it here
        raise FreqviInputError(
            f"unknown optimiser {optim!r}; use one of {sorted(OPTIMIZERS)}, a torch.optim optimiser "
            "or a pyro.optim instance."
        )
    options = {"lr": check_positive_float(lr, "lr")}
    if optim in _MULTI_TENSOR:
        options["foreach"] = True  # one fused update for all tensors; CPU's default updates each alone
    return OPTIMIZERS[optim](params, **options)


_MULTI_TENSOR = {"adam", "sgd", "rmsprop", "adagrad"}

"""A :class:`~pyro.nn.PyroModule`'s torch submodule, read without re-registering its parameters where
that would change nothing.

Inside a :func:`~pyro.nn.pyro_method`, reading a plain :class:`torch.nn.Module` attribute of a
``PyroModule`` calls :func:`pyro.module` on it: every parameter becomes a ``pyro.param`` statement,
which sends a message through every effect handler on Pyro's stack and looks the parameter up in
the param store. That is how Pyro's :class:`~pyro.infer.SVI` (whose trace records ``param`` sites)
and :func:`freqvi.fit`'s check of the pair find a network's parameters, and how the store learns
them the first time. At every later step of a fit it is pure cost: a tenth of a millisecond of a
small diffusion model's step, for a loss that reads the network directly.

:func:`submodule` skips it exactly when it would have no effect: the store already holds each
parameter under its name as that very tensor (so ``pyro.module`` would add or change no entry) and
no handler on Pyro's stack acts on ``param`` messages (so none would see the sites, record them,
replace their values or lift them to random variables).
"""

from __future__ import annotations

import pyro
from pyro.nn import PyroModule
from pyro.nn.module import _is_module_local_param_enabled
from pyro.params.param_store import param_with_module_name
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from torch import nn


def submodule(owner: PyroModule, name: str) -> nn.Module:
    """``getattr(owner, name)``, the plain torch module ``name`` of ``owner``, without its ``pyro.module``
    statement where that statement would change nothing and be seen by no handler (module docstring)."""
    module = owner._modules[name]
    if not owner._pyro_context.active or _is_module_local_param_enabled() or not _unobserved() \
            or not _registered(owner, name, module):
        return getattr(owner, name)
    return module


def _unobserved() -> bool:
    """Whether no effect handler on Pyro's stack acts on a ``param`` message: each keeps
    :class:`~pyro.poutine.messenger.Messenger`'s dispatch and has no ``param`` method of its own."""
    return all(type(m)._process_message is Messenger._process_message
               and type(m)._postprocess_message is Messenger._postprocess_message
               and getattr(m, "_pyro_param", None) is None and getattr(m, "_pyro_post_param", None) is None
               for m in _PYRO_STACK)


def _registered(owner: PyroModule, name: str, module: nn.Module) -> bool:
    """Whether the param store holds every trainable parameter of ``module`` under the name
    ``pyro.module`` gives it, as that very tensor."""
    stored = pyro.get_param_store()._params  # the unconstrained tensors by name, as PyroModule reads them
    prefix = owner._pyro_get_fullname(name)
    return all(stored.get(param_with_module_name(prefix, key)) is p
               for key, p in module.named_parameters() if p.requires_grad)

"""Effect handlers that turn one model/guide pair into each of EM's steps.

* :class:`FrozenPosterior` replays the *distributions* (not the values) that a
  guide produced at the E-step, so that during the M-step the guide stays the
  posterior at theta' while the model's parameters theta move.
* :class:`SubsamplePlate` fixes which observations a data plate visits, so a
  driver can minibatch any model written with ``pyro.plate("data", n)``.
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_struct import Trace


class FrozenPosterior(Messenger):
    """Replaces each latent site's distribution by the one recorded in ``trace``.

    Run a guide under this handler and it emits, site by site, the distributions
    of the recorded guide trace: q(z | x; theta') with theta' the parameters at
    the time of the recording. Fresh values are drawn from them (or enumerated,
    under :class:`~pyro.infer.TraceEnum_ELBO`), and the subsample indices of
    every plate are replayed so that the guide and the model see the same data.

    :param trace: a guide trace, recorded under ``torch.no_grad()`` so that
        its distributions carry no gradient to theta.
    """

    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace

    def _pyro_sample(self, msg) -> None:
        site = self.trace.nodes.get(msg["name"])
        if site is None or msg["is_observed"]:
            return
        if isinstance(site["fn"], _Subsample):
            msg["value"] = site["value"]
            msg["done"] = True
        else:
            msg["fn"] = site["fn"]


class SubsamplePlate(Messenger):
    """Makes the plate called ``name`` visit only ``indices`` and stand for ``size`` observations.

    With ``indices`` (a 1-D ``LongTensor``), Pyro scales every site inside the
    plate by ``full / len(indices)``, ``full`` the plate's declared size, so the
    log-density of a minibatch is an unbiased estimate of the full data's; the
    model must index its data with the plate's indices
    (``with pyro.plate("data", n) as i: ... obs=x[i]``). With ``size``, the
    plate's sites are further scaled by ``size / full`` and its frame records
    ``size`` as the full size: the data passed in are ``full`` of ``size``
    observations (a batch streamed from a larger data set, or one process's shard).

    :param name: the plate's name.
    :param indices: the observations to visit, or ``None`` for all the plate declares.
    :param size: the number of observations the plate stands for, or ``None`` for its declared size.
    """

    def __init__(self, name: str, indices: torch.Tensor | None = None, size: int | None = None):
        super().__init__()
        self.name = name
        self.indices = indices
        self.size = size

    def _pyro_sample(self, msg) -> None:
        if isinstance(msg["fn"], _Subsample):
            if msg["name"] == self.name and self.indices is not None:
                msg["value"] = self.indices
                msg["done"] = True
            return
        if self.size is None:
            return
        stack = msg["cond_indep_stack"]
        for k, frame in enumerate(stack):
            if frame.name == self.name and frame.full_size != self.size:
                msg["scale"] = msg["scale"] * (self.size / frame.full_size)
                msg["cond_indep_stack"] = (*stack[:k], frame._replace(full_size=self.size), *stack[k + 1:])

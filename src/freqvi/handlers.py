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
    """Makes the plate called ``name`` visit only ``indices``.

    Pyro scales every site inside the plate by ``size / len(indices)``, so
    the log-density of a minibatch is an unbiased estimate of the full data's.
    The model must index its data with the plate's indices
    (``with pyro.plate("data", n) as i: ... obs=x[i]``).

    :param name: the plate's name.
    :param indices: a 1-D ``LongTensor`` of observation indices.
    """

    def __init__(self, name: str, indices: torch.Tensor):
        super().__init__()
        self.name = name
        self.indices = indices

    def _pyro_sample(self, msg) -> None:
        if msg["name"] == self.name and isinstance(msg["fn"], _Subsample):
            msg["value"] = self.indices
            msg["done"] = True

"""A mean-field guide with free parameters for every observation (variational EM)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.nn import PyroModule, PyroParam

from freqvi.errors import FreqviInputError
from freqvi.traces import latent_sites, trace

_names = itertools.count()


class LocalMeanField(PyroModule):
    r"""Fully factorised guide :math:`q(z) = \prod_i \prod_s q(z_{i,s}; \lambda_{i,s})`.

    Every latent site of the model gets its own free local parameters
    :math:`\lambda_{i,s}`, one set per plate element (per observation), so
    maximising the ELBO over them is the approximate E-step of variational EM
    (paper section 3):

    * a discrete site with enumerable support ``{0, ..., K-1}`` gets a
      ``Categorical(logits)`` with logits of shape ``batch_shape + (K,)``, marked
      for parallel enumeration (exact under :class:`~pyro.infer.TraceEnum_ELBO`);
    * a continuous site gets a diagonal Normal on the unconstrained space,
      pushed through ``biject_to(support)``; locs and scales have shape
      ``batch_shape + event_shape``.

    Parameters are created on the first call from a trace of the model over the
    full data, with plate dimensions at their full size; calls under a
    subsampled plate index them by the plate's indices.

    :param model: the model, a callable taking the same arguments as the guide.
    :param init_scale: initial standard deviation of continuous factors.
    """

    def __init__(self, model: Callable, init_scale: float = 1.0):
        super().__init__(name=f"LocalMeanField_{next(_names)}")
        self._model = (model,)  # a tuple, so a PyroModule model is not registered as a child
        self.init_scale = init_scale
        self._sites: dict[str, dict] | None = None

    def _setup(self, *args, **kwargs) -> None:
        self._sites = {}
        for name, site in latent_sites(trace(self._model[0], *args, **kwargs)).items():
            fn = site["fn"]
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            batch = list(fn.batch_shape)
            for f in frames:
                batch[f.dim] = f.full_size or f.size
            info = {"frames": frames, "event_dim": fn.event_dim, "discrete": fn.has_enumerate_support}
            safe = name.replace(".", "_")
            dtype = _dtype(fn, site["value"])
            if fn.has_enumerate_support:
                support = fn.enumerate_support(expand=False).reshape(-1)
                if not torch.equal(support, torch.arange(len(support), dtype=support.dtype)):
                    raise FreqviInputError(
                        f"LocalMeanField supports discrete sites with values 0..K-1; site {name!r} "
                        f"has support {support.tolist()}."
                    )
                logits = torch.zeros([*batch, len(support)], dtype=dtype)
                setattr(self, f"{safe}_logits", PyroParam(logits, event_dim=1))
                info["event_dim"] = 1
            else:
                shape = [*batch, *fn.event_shape]
                setattr(self, f"{safe}_loc", PyroParam(torch.zeros(shape, dtype=dtype)))
                scale = torch.full(shape, self.init_scale, dtype=dtype)
                setattr(self, f"{safe}_scale", PyroParam(scale, constraints.positive))
                info["support"] = fn.support
            self._sites[name] = info

    def forward(self, *args, **kwargs) -> None:
        """Samples every latent site of the model from its local factor."""
        if self._sites is None:
            self._setup(*args, **kwargs)
        plates = {}
        for name, info in self._sites.items():
            with ExitStack() as stack:
                for f in info["frames"]:
                    if f.name not in plates:
                        full = f.full_size or f.size
                        plates[f.name] = pyro.plate(
                            f.name, full, subsample_size=f.size if f.size < full else None, dim=f.dim
                        )
                    stack.enter_context(plates[f.name])
                infer = {"enumerate": "parallel"} if info["discrete"] else {}
                pyro.sample(name, self._factor(name, info, plates), infer=infer)

    def _factor(self, name: str, info: dict, plates: dict) -> dist.Distribution:
        safe = name.replace(".", "_")
        if info["discrete"]:
            logits = self._local(getattr(self, f"{safe}_logits"), info, plates)
            return dist.Categorical(logits=logits)
        loc = self._local(getattr(self, f"{safe}_loc"), info, plates)
        scale = self._local(getattr(self, f"{safe}_scale"), info, plates)
        event_dim = info["event_dim"]
        base = dist.Normal(loc, scale).to_event(event_dim)
        if _is_real(info["support"]):
            return base
        return dist.TransformedDistribution(base, biject_to(info["support"]))

    @staticmethod
    def _local(param: torch.Tensor, info: dict, plates: dict) -> torch.Tensor:
        """Selects the rows of ``param`` that the current subsample visits."""
        for f in info["frames"]:
            plate = plates[f.name]
            if plate.subsample_size < plate.size:
                param = param.index_select(f.dim - info["event_dim"], plate.indices)
        return param



def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _dtype(fn, value) -> torch.dtype:
    """The floating dtype of a site: its value's, or its discrete distribution's logits'."""
    if value.is_floating_point():
        return value.dtype
    logits = getattr(fn, "logits", None)
    return logits.dtype if isinstance(logits, torch.Tensor) else torch.get_default_dtype()

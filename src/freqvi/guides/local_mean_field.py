"""A mean-field guide with free parameters for every observation (variational EM)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from freqvi.errors import FreqviInputError
from freqvi.guides._sites import LatentSite, inside_plates, model_latent_sites, normal_factor, site_plates
from freqvi.validation import check_positive_float

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
      ``batch_shape + unconstrained_event_shape`` (the event shape, except for
      supports such as the simplex whose bijection changes it).

    Parameters are created on the first call from a trace of the model over the
    full data, with plate dimensions at their full size; calls under a
    subsampled plate index them by the plate's indices.

    The factors belong to the observations of that first call: every later call
    must pass arguments of the same shapes (the same data, or other values of the
    same size), else :class:`~freqvi.errors.FreqviInputError` is raised before
    anything is drawn. For other data, build a new guide.

    :param model: the model, a callable taking the same arguments as the guide.
    :param init_scale: initial standard deviation of continuous factors.
    :raises ~freqvi.errors.FreqviInputError: for an ``init_scale`` that is not a finite number > 0.
    """

    def __init__(self, model: Callable, init_scale: float = 1.0):
        super().__init__(name=f"LocalMeanField_{next(_names)}")
        self._model = (model,)  # a tuple, so a PyroModule model is not registered as a child
        self.init_scale = check_positive_float(init_scale, "init_scale")
        self._sites: dict[str, LatentSite] | None = None
        self._shapes: list[tuple[int, ...] | None] = []

    def _setup(self, *args, **kwargs) -> None:
        sites = model_latent_sites(self._model[0], *args, **kwargs)
        for site in sites.values():
            safe = site.name.replace(".", "_")
            if site.values is not None:
                if not torch.equal(site.values, torch.arange(len(site.values), dtype=site.values.dtype)):
                    raise FreqviInputError(
                        f"LocalMeanField supports discrete sites with values 0..K-1; site {site.name!r} "
                        f"has support {site.values.tolist()}."
                    )
                logits = torch.zeros([*site.batch_shape, len(site.values)], dtype=site.dtype)
                setattr(self, f"{safe}_logits", PyroParam(logits, event_dim=1))
            else:
                shape = [*site.batch_shape, *site.unconstrained_event_shape]
                setattr(self, f"{safe}_loc", PyroParam(torch.zeros(shape, dtype=site.dtype)))
                scale = torch.full(shape, self.init_scale, dtype=site.dtype)
                setattr(self, f"{safe}_scale", PyroParam(scale, constraints.positive))
        self._sites, self._shapes = sites, _shapes(args)

    def categorical_logits(self) -> list[torch.Tensor]:
        """The logits parameters of the discrete factors, shape ``batch_shape + (K,)`` each (empty
        before the first call). Each is a site's logits up to a constant per row."""
        sites = self._sites or {}
        return [getattr(self, f"{name.replace('.', '_')}_logits_unconstrained")
                for name, site in sites.items() if site.values is not None]

    def forward(self, *args, **kwargs) -> None:
        """Samples every latent site of the model from its local factor."""
        if self._sites is None:
            self._setup(*args, **kwargs)
        else:
            self._check_shapes(args)
        plates = site_plates(self._sites.values())
        for site in self._sites.values():
            with inside_plates(site, plates):
                infer = {"enumerate": "parallel"} if site.values is not None else {}
                pyro.sample(site.name, self._factor(site, plates), infer=infer)

    def _check_shapes(self, args: tuple) -> None:
        """Raises unless ``args`` have the shapes of the data the factors were built for."""
        shapes = _shapes(args)
        if shapes != self._shapes:
            sizes = {f.name: f.full_size or f.size for site in self._sites.values() for f in site.frames}
            raise FreqviInputError(
                f"this {type(self).__name__} guide holds free parameters for each element of the plates "
                f"{sizes}, built for data of shapes {self._shapes}; it is now called with data of shapes "
                f"{shapes}. Its factors are the posteriors of those observations and cannot serve others: "
                "build a new guide for these data (LocalMeanField(model), or a new model whose guide is one)."
            )

    def _factor(self, site: LatentSite, plates: dict) -> dist.Distribution:
        safe = site.name.replace(".", "_")
        if site.values is not None:
            logits = self._local(getattr(self, f"{safe}_logits"), site, 1, plates)
            return dist.Categorical(logits=logits)
        event_dim = len(site.unconstrained_event_shape)
        loc = self._local(getattr(self, f"{safe}_loc"), site, event_dim, plates)
        scale = self._local(getattr(self, f"{safe}_scale"), site, event_dim, plates)
        return normal_factor(loc, scale, site)

    @staticmethod
    def _local(param: torch.Tensor, site: LatentSite, event_dim: int, plates: dict) -> torch.Tensor:
        """Selects the rows of ``param`` that the current subsample visits."""
        for f in site.frames:
            plate = plates[f.name]
            if plate.subsample_size < plate.size:
                param = param.index_select(f.dim - event_dim, plate.indices)
        return param


def _shapes(args: tuple) -> list[tuple[int, ...] | None]:
    """The shape of each tensor argument (``None`` for others)."""
    return [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args]

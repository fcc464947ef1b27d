"""What every guide builder needs to know of a model: its latent sites, their plates and supports."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.poutine.indep_messenger import CondIndepStackFrame

from freqvi.traces import latent_sites, trace


@dataclass(frozen=True)
class LatentSite:
    """One latent site of a model, as a run of the model on the full data shows it.

    :ivar frames: the site's vectorised plates, outermost first.
    :ivar batch_shape: the site's batch shape with every plate at its full size.
    :ivar values: the flattened enumerable support of a discrete site, else ``None``.
    """

    name: str
    frames: tuple[CondIndepStackFrame, ...]
    batch_shape: torch.Size
    event_shape: torch.Size
    support: constraints.Constraint
    dtype: torch.dtype
    values: torch.Tensor | None

    @property
    def unconstrained_event_shape(self) -> torch.Size:
        """The event shape on the unconstrained space that ``biject_to(support)`` maps from."""
        return torch.Size(biject_to(self.support).inverse_shape(self.event_shape))


def model_latent_sites(model: Callable, *args, **kwargs) -> dict[str, LatentSite]:
    """Runs ``model`` once and describes its latent sites, in the order it samples them."""
    sites = {}
    for name, site in latent_sites(trace(model, *args, **kwargs)).items():
        fn = site["fn"]
        frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
        batch = list(fn.batch_shape)
        for f in frames:
            batch[f.dim] = f.full_size or f.size
        values = fn.enumerate_support(expand=False).reshape(-1) if fn.has_enumerate_support else None
        sites[name] = LatentSite(name, frames, torch.Size(batch), fn.event_shape, fn.support,
                                 _dtype(fn, site["value"]), values)
    return sites


def site_plates(sites: Iterable[LatentSite], sizes: Mapping[str, int] | None = None) -> dict[str, pyro.plate]:
    """One plate per vectorised frame of ``sites``, as the model has it.

    Each plate gets the frame's dim, its full size (or ``sizes[name]``) and, where the
    model subsampled it, the model's subsample size; a handler such as
    :class:`~freqvi.handlers.SubsamplePlate` may still choose the indices.
    """
    sizes = sizes or {}
    plates = {}
    for site in sites:
        for f in site.frames:
            if f.name not in plates:
                full = f.full_size or f.size
                subsample_size = f.size if f.size < full else None
                plates[f.name] = pyro.plate(f.name, sizes.get(f.name, full),
                                            subsample_size=subsample_size, dim=f.dim)
    return plates


@contextmanager
def inside_plates(site: LatentSite, plates: Mapping[str, pyro.plate]) -> Iterator[None]:
    """Enters the plates of ``site``, outermost first."""
    with ExitStack() as stack:
        for f in site.frames:
            stack.enter_context(plates[f.name])
        yield


def normal_factor(loc: torch.Tensor, scale: torch.Tensor, site: LatentSite) -> dist.Distribution:
    r"""``N(loc, diag scale^2)`` on the unconstrained space, pushed through ``biject_to(support)``.

    ``loc`` and ``scale`` have shape ``batch_shape + unconstrained_event_shape``; the
    factor's event shape is the site's.
    """
    base = dist.Normal(loc, scale).to_event(len(site.unconstrained_event_shape))
    if _is_real(site.support):
        return base
    return dist.TransformedDistribution(base, biject_to(site.support))


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

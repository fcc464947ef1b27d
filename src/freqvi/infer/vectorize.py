"""The particle dimension: what a model must allow to be drawn ``K`` times at once, checked before the work.

``em`` (its recorded objective and gradient M-step), ``log_likelihood`` (the
importance weights), Louis's identity in ``observed_information`` and every
estimator that vectorises particles (IWAE, DReG, STL, a Pyro ELBO with
``vectorize_particles=True``) run the model and guide once for ``K`` draws, with
a new batch dimension of size ``K`` left of every plate, at ``dim = -(P + 1)``
for a pair that nests ``P`` plates. Code written for one draw must broadcast
over it. :func:`check_particles` runs the pair once that way before the first
step and, where the pair does not broadcast, raises a
:class:`~freqvi.errors.FreqviInputError` that states the rule, instead of a raw
shape error deep in a step (or, worse, a silently misaligned density).

Why an error and not a loop over particles: IWAE, DReG and STL need all ``K``
draws of an observation together, so a loop would mean a second implementation
of each estimator (and of Pyro's enumeration in ``em``), at ``K`` times the cost
(16x for ``em``'s default); the rule is Pyro's own (``vectorize_particles``,
``pyro.infer.Predictive(parallel=True)``), and a model written to it runs on
every route.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample
from pyro.util import check_site_shape

from freqvi.errors import FreqviInputError
from freqvi.traces import trace

#: The plate that :func:`check_particles` adds; its name says where a shape error came from.
CHECK_PLATE = "_particles_check"

BROADCASTING_RULE = (
    "Write the model and guide for any number of leftmost batch dimensions: index and reshape along the "
    "right (a per-group latent u drawn in pyro.plate('groups', G) is read as u[..., group], not u[group]; "
    "z @ W.T rather than W @ z; x.reshape(*x.shape[:-2], -1) rather than x.reshape(n, -1)), give every "
    "batch dimension a pyro.plate (with dim= where plates nest), and let tensors the model creates "
    "broadcast (x.new_zeros(()) rather than torch.zeros(n)). See 'Your own model' in the README."
)


def check_particles(model: Callable, guide: Callable | None, data: tuple, num_particles: int,
                    plate_nesting: int, route: str) -> None:
    """Runs ``guide`` then ``model`` (replayed) once under a particle plate at ``dim = -(plate_nesting + 1)``,
    as a vectorising driver will, and checks every sample site's shape.

    The plate has ``min(num_particles, 2)`` elements: two already tell a dimension
    that broadcasts from one that does not, at a small share of a step's cost (a
    ``log_likelihood`` draws thousands). A site's log-density must have the size of
    each of its plates at that plate's dimension, the particle plate included
    (:func:`pyro.util.check_site_shape`).

    :param guide: the guide, or ``None`` for a model run alone (its latents drawn from the prior).
    :param route: what draws the particles, for the message (``"em"``, ``"IWAE_ELBO"``, ...).
    :raises FreqviInputError: where the run fails or a shape disagrees, with the
        broadcasting rule and the underlying error.
    """
    dim = -(plate_nesting + 1)
    size = min(num_particles, 2)
    particles = pyro.plate(CHECK_PLATE, size, dim=dim)
    try:
        # validation off: a value outside a support is the step guard's to report, not a shape error;
        # the forked generator leaves the run's draws as they were
        with torch.no_grad(), torch.random.fork_rng(), pyro.validation_enabled(False):
            traces = []
            if guide is not None:
                traces.append(trace(particles(guide), *data))
                model = poutine.replay(model, trace=traces[0])
            traces.append(trace(particles(model), *data))
            for tr in traces:
                tr.compute_log_prob(lambda name, site: not isinstance(site["fn"], _Subsample))
                for site in tr.nodes.values():
                    if site["type"] == "sample" and "log_prob" in site:
                        check_site_shape(site, plate_nesting + 1)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise FreqviInputError(
            f"{route} draws its {num_particles} particles at once along a new batch dimension left of every "
            f"plate (dim={dim}), and the model/guide pair does not broadcast over it (run with {size}): "
            f"{type(exc).__name__}: {_first_line(exc)}. {BROADCASTING_RULE}"
        ) from exc


def _first_line(exc: Exception) -> str:
    """The error's first line (Pyro appends a whole trace-shape table)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

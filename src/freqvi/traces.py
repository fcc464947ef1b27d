"""Inspection of model and guide traces: latent sites, data plate, agreement.

These helpers run a program once, with its effects blocked, to learn its
structure; drivers call them before any fitting so that a mismatched pair
fails fast with a readable message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_struct import Trace
from pyro.util import get_rng_state, set_rng_state

from freqvi.errors import FreqviInputError
from freqvi.validation import dtype_note


def trace(fn: Callable, *args, **kwargs) -> Trace:
    """Records one run of ``fn``; its side effects on enclosing handlers are blocked."""
    with poutine.block():
        return poutine.trace(fn).get_trace(*args, **kwargs)


def latent_sites(tr: Trace) -> dict[str, dict]:
    """The unobserved sample sites of a trace, subsample sites left out."""
    return {
        name: site
        for name, site in tr.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], _Subsample)
    }


def observed_sites(tr: Trace) -> dict[str, dict]:
    """The observed sample sites of a trace."""
    return {
        name: site
        for name, site in tr.nodes.items()
        if site["type"] == "sample" and site["is_observed"]
    }


def is_auxiliary(site: dict) -> bool:
    """Whether a guide site is auxiliary: drawn by the guide only, to compute the model's latents.

    Pyro's autoguides that draw one joint vector (``AutoDiagonalNormal``,
    ``AutoMultivariateNormal``, ...) mark it ``infer={"is_auxiliary": True}`` and give each
    model latent as a ``Delta`` whose log-density carries the transform's Jacobian, so the
    guide's total log-density is that of the model's latent values.
    """
    return bool(site["infer"].get("is_auxiliary", False))


def is_point_mass(fn) -> bool:
    """Whether a distribution is a point mass: a ``Delta``, possibly reshaped, masked or transformed."""
    while not isinstance(fn, dist.Delta) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def check_proposal(guide: Callable, guide_trace: Trace, *args, **kwargs) -> None:
    """Refuses a guide that puts a point mass on a model latent: it is no importance proposal.

    Importance weights :math:`p(x, z) / q(z)` need a proposal density over the
    model's latent values. A guide site that is a ``Delta`` has one only when
    its value is a function of auxiliary draws (an autoguide's joint vector,
    its Jacobian in the ``Delta``'s log density); ``AutoDelta`` and other
    point-mass guides put all their mass on one value. Such a site is told
    apart by drawing the guide twice (``guide_trace`` and a fresh run): a point
    mass keeps its value, a transformed auxiliary draw does not.

    :raises FreqviInputError: naming the point-mass sites and a guide to use instead.
    """
    masses = [name for name, site in latent_sites(guide_trace).items()
              if not is_auxiliary(site) and is_point_mass(site["fn"])]
    if masses and any(is_auxiliary(site) for site in latent_sites(guide_trace).values()):
        rng = get_rng_state()  # the check leaves the caller's random stream as it was
        with torch.no_grad():
            again = trace(guide, *args, **kwargs).nodes
        set_rng_state(rng)
        masses = [name for name in masses
                  if torch.equal(again[name]["value"], guide_trace.nodes[name]["value"])]
    if masses:
        raise FreqviInputError(
            f"the guide puts a point mass (Delta, as AutoDelta does) on the latent site(s) {masses}: "
            "importance sampling and importance-weighted bounds need a proposal with a density that "
            "covers the posterior, and a point mass gives log p(x, z_hat) with no standard error, "
            "not log p(x). Use a guide with a density, e.g. pyro.infer.autoguide.AutoNormal or "
            "AutoMultivariateNormal (initialised at the point estimate with init_to_value), "
            "freqvi.guides.LocalMeanField or AmortizedNormal."
        )


def is_enumerated(site: dict) -> bool:
    """Whether a site asks to be summed out by parallel enumeration."""
    return site["infer"].get("enumerate") == "parallel"


def max_plate_nesting(*traces: Trace) -> int:
    """How many plate dimensions the programs use, at most (0 without plates)."""
    dims = [
        -frame.dim
        for tr in traces
        for site in tr.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def data_plate(model_trace: Trace, name: str, num_data: int):
    """The frame of the plate called ``name``, checked to range over all ``num_data`` rows."""
    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name == name and frame.vectorized:
                size = frame.full_size or frame.size
                if size != num_data:
                    raise FreqviInputError(
                        f"the model's plate {name!r} has size {size}, but the data has "
                        f"{num_data} observations; write pyro.plate({name!r}, len(x)) in the model."
                    )
                return frame
    raise FreqviInputError(
        f"the model has no vectorised plate called {name!r} over the observations; write "
        f"`with pyro.plate({name!r}, len(x)) as i:` around its per-observation sites "
        "(or pass the plate's name to the driver as data_plate_name=...)."
    )


def outside_data_plate(sites: dict[str, dict], frame) -> list[str]:
    """The names of ``sites`` (trace sites, by name) that do not sit inside the data plate ``frame``."""
    return sorted(name for name, site in sites.items()
                  if not any(f.name == frame.name for f in site["cond_indep_stack"]))


def check_pair(model: Callable, guide: Callable, data: tuple[torch.Tensor, ...]):
    """Runs model and guide once and checks that their latent sites agree.

    Every latent site of the guide must be a latent site of the model (or be marked
    auxiliary, as Pyro's autoguides mark their joint draw), and every
    latent site of the model must be covered by the guide unless the model sums
    it out by enumeration. Returns the two traces. A guide site marked for parallel
    enumeration takes the first value of its support rather than a draw (the values have
    the shapes of a draw).
    """
    with _run_on(data, "the model/guide pair"), torch.no_grad():
        guide_trace = trace(_FirstOfSupport()(guide), *data)
        model_trace = trace(poutine.replay(model, trace=guide_trace), *data)
        for tr in (guide_trace, model_trace):
            _compute_densities(tr)
    _check_plate_sizes(model_trace, guide_trace)
    model_latent = latent_sites(model_trace)
    guide_latent = latent_sites(guide_trace)
    extra = sorted(name for name, site in guide_latent.items()
                   if name not in model_latent and not is_auxiliary(site))
    missing = sorted(
        name for name, site in model_latent.items()
        if name not in guide_latent and not is_enumerated(site)
    )
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"the guide samples {extra}, which the model does not have as latent sites "
                         "(a site the guide draws only to compute others needs "
                         "infer={'is_auxiliary': True})")
        if missing:
            parts.append(f"the model's latent sites {missing} have no site in the guide "
                         "(and are not marked infer={'enumerate': 'parallel'})")
        raise FreqviInputError("model and guide do not match: " + "; ".join(parts) + ".")
    return model_trace, guide_trace


class _FirstOfSupport(Messenger):
    """Gives each site marked ``infer={"enumerate": "parallel"}`` the first value of its support, in
    the broadcastable shape enumeration gives it (a size-1 dimension for each batch dimension),
    instead of a draw: every estimator sums such a site out with its values so shaped, and a draw
    of one value per row, with the model's parameters gathered for every row, cost most of the
    check (20,000 rows of a 5-component full-covariance mixture: 7.2 ms, against 3.7 ms so)."""

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or msg["value"] is not None or not is_enumerated(msg) \
                or not getattr(fn, "has_enumerate_support", False):
            return
        first = fn.enumerate_support(expand=False)[0]
        msg["value"] = first.expand((1,) * len(fn.batch_shape) + fn.event_shape)
        msg["done"] = True


_SHAPE_NOTE = (" (a site's value must broadcast with its distribution's batch_shape + event_shape: "
               "a multivariate observation needs .to_event(1); under batch_size the data plate selects rows, "
               "so observe those: `with pyro.plate('data', len(x)) as i: ... obs=x[i]`)")


def check_model(model: Callable, data: tuple[torch.Tensor, ...]) -> Trace:
    """Runs ``model`` once on ``data`` (no guide: a driver that needs none) and returns its trace, its
    log-densities computed; a run that fails is a :class:`~freqvi.errors.FreqviInputError`, as in
    :func:`check_pair`, and a site marked for parallel enumeration takes its first value, as there."""
    with _run_on(data, "the model"):
        model_trace = trace(_FirstOfSupport()(model), *data)
        _compute_densities(model_trace)
    return model_trace


@contextmanager
def _run_on(data: tuple[torch.Tensor, ...], what: str) -> Iterator[None]:
    """Turns an error raised by running ``what`` on ``data`` into a
    :class:`~freqvi.errors.FreqviInputError` saying so."""
    try:
        yield
    except FreqviInputError:
        raise
    except KeyError as exc:
        raise FreqviInputError(_key_error_message(exc)) from exc
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise FreqviInputError(
            f"running {what} on the data failed: {type(exc).__name__}: {exc}{dtype_note(data)}"
            + _SHAPE_NOTE * any(word in str(exc) for word in ("broadcast", "size of tensor", "shape"))
        ) from exc


def _compute_densities(tr: Trace) -> None:
    """Computes a trace's log-densities, so that a density that cannot take its values (a dtype it
    refuses, a shape that does not broadcast: RuntimeError) fails before any step.

    Values outside a support (a ValueError under validation, as Pyro wraps it) are left to the
    drivers' step guard, which names the site whose log-density is not finite; a shape that Pyro's
    validation refuses (also a ValueError: an event shape that does not match, ``obs=x`` under a
    subsampled plate) fails here.
    """
    try:
        tr.compute_log_prob(lambda name, site: not isinstance(site["fn"], _Subsample))
    except ValueError as exc:
        if "support" not in str(exc):  # a shape Pyro's validation refuses is the pair's error, not the data's
            raise


def _plate_sizes(tr: Trace) -> dict[str, int]:
    """The full size of each vectorised plate of a trace's sample sites."""
    return {frame.name: frame.full_size or frame.size
            for site in tr.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized}


def _check_plate_sizes(model_trace: Trace, guide_trace: Trace) -> None:
    """Raises where model and guide give one plate different sizes: a guide built for other data."""
    model_sizes, guide_sizes = _plate_sizes(model_trace), _plate_sizes(guide_trace)
    differ = {name: (model_sizes[name], size) for name, size in guide_sizes.items()
              if name in model_sizes and model_sizes[name] != size}
    if differ:
        raise FreqviInputError(
            "model and guide disagree on the size of the plates (model, guide) "
            f"{differ}: the guide holds state for other data (one value per observation of another data "
            "set); build the guide for these data."
        )


def _key_error_message(exc: KeyError) -> str:
    """What a KeyError while first running a pair means: usually a ``pyro.param`` read before it exists."""
    key = exc.args[0] if exc.args else None
    if isinstance(key, str) and key not in pyro.get_param_store():
        return (f"running the model/guide pair on the data failed: pyro.param({key!r}) was read before it "
                "was created. Drivers run the guide first (as SVI does), so a guide that reads the model's "
                f"parameters must create them as the model does: pyro.param({key!r}, initial_value), or "
                "share a function that creates them with the model.")
    return f"running the model/guide pair on the data failed: KeyError: {exc}"


def param_names(tr: Trace) -> set[str]:
    """Names of the ``pyro.param`` sites recorded in a trace."""
    return {name for name, site in tr.nodes.items() if site["type"] == "param"}


def unconstrained_params(names) -> list[torch.Tensor]:
    """The leaf tensors an optimiser updates for the named params, in the order of ``names``.

    A set is taken in sorted order. A list keeps its order, so ``zip(names, tensors)`` pairs each
    name with its own tensor (re-sorting here once paired ``Net_0.scale`` with ``NetGuide_0.loc``'s
    tensor, since callers sort by names without instance numbers).
    """
    store = pyro.get_param_store()
    ordered = sorted(names) if isinstance(names, set | frozenset) else names
    return [store.get_param(n).unconstrained() for n in ordered]

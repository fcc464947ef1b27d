"""Shared machinery of the particle estimators: log importance weights per observation.

For ``K`` draws :math:`z_k \\sim q(z \\mid x)` (vectorised over an outermost
particle plate) the log weight of draw ``k`` splits over the data plate,

.. math::

    \\log w_k = \\log p(x, z_k) - \\log q(z_k \\mid x)
              = g_k + \\sum_i \\log w_{ik},

where :math:`\\log w_{ik}` collects the sites inside the data plate (observation
``i``) and :math:`g_k` the sites outside it. When every latent site lies inside
the data plate, the draws of different observations are independent and each
observation gets its own importance-weighted bound,
:math:`\\sum_i \\log \\frac1K \\sum_k w_{ik}`, which is far tighter than the
bound on the joint weight :math:`\\log \\frac1K \\sum_k w_k` (what
:class:`pyro.infer.RenyiELBO` computes); otherwise the joint weight is used.

Sites of the model that the guide lacks are drawn from the model's prior, the
proposal for them, so their density cancels from the weight. Draws that are not
reparameterisable (discrete sites) contribute score-function terms.

:math:`\\log q` is the guide trace's whole log density, as in Pyro's
:class:`~pyro.infer.Trace_ELBO`: an autoguide that draws an auxiliary vector
``u`` (``infer={"is_auxiliary": True}``) and hands the model ``z = T(u)`` through
``Delta`` sites contributes :math:`\\log q(u) - \\log|\\det \\partial T/\\partial u|`,
the density of the model's latent values. A joint auxiliary vector lies outside
the data plate, so such a guide gets the joint weight. A guide that puts a point
mass on a model latent (``AutoDelta``) has no importance weights and is refused
on the first call (``freqvi.traces.check_proposal``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import detach, scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, get_rng_state, set_rng_state

from freqvi.traces import check_proposal, is_point_mass, latent_sites, max_plate_nesting, trace
from freqvi.validation import check_positive_int

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class LogWeights:
    """Log importance weights of ``K`` particles, arranged for per-observation bounds.

    :ivar log_w: :math:`\\log w_{ki}`, shape ``(K, b)``: one column per observation of
        the (sub)sampled data plate, or a single column holding the joint weight
        when a latent site lies outside the data plate.
    :ivar score: the summed log proposal density of the non-reparameterised draws
        behind each entry of ``log_w`` (attached to the parameters), shape ``(K, b)``.
    :ivar scale: the factor :math:`n / b` of a subsampled data plate (1 if joint).
    :ivar offset: terms outside the data plate that do not depend on the draws,
        averaged over particles, shape ``()``.
    :ivar values: the guide's reparameterised base draws (not the point masses an
        auxiliary draw determines), each with the shape that lays a ``(K, b)``
        tensor onto it (for gradient hooks).
    :ivar joint: whether ``log_w`` holds the joint weight (one column).
    """

    log_w: torch.Tensor
    score: torch.Tensor
    scale: float
    offset: torch.Tensor
    values: list[tuple[torch.Tensor, tuple[int, ...]]]
    joint: bool = False

    def log_mean_weight(self) -> torch.Tensor:
        """:math:`\\log \\frac1K \\sum_k w_{ki}`, shape ``(b,)``."""
        return self.log_w.logsumexp(0) - math.log(self.log_w.shape[0])

    def total(self, per_column: torch.Tensor) -> torch.Tensor:
        """Sums a per-column quantity over the data plate, scaled, plus the offset."""
        return self.scale * per_column.sum() + self.offset


class ParticleELBO(ELBO):
    """Base of the estimators built on :class:`LogWeights`.

    A subclass implements ``_objective``, which maps the weights to the
    bound's value and a surrogate whose gradient is the estimator's; the loss is
    the negative bound, carrying the surrogate's gradient.

    :param num_particles: ``K``, draws per observation, vectorised.
    :param max_plate_nesting: plates the model and guide nest (not counting the
        particle plate); guessed from one run if infinite.
    :param data_plate: the name of the plate over observations.
    """

    #: Whether the guide's log density is taken with its parameters held fixed,
    #: so that guide gradients flow along the draws' paths only.
    path_derivative = False
    #: Whether ``differentiable_loss`` can be traced into a graph
    #: (:class:`~freqvi.infer.compiled.CompiledLoss`): no gradient hooks.
    traceable = True

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"),
                 data_plate: str = "data"):
        num_particles = check_positive_int(num_particles, "num_particles")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True)
        self.max_plate_nesting = max_plate_nesting  # without the particle plate, unlike Pyro's
        self.data_plate = data_plate
        self._proposal_checked = False

    # ----- the ELBO interface -----------------------------------------------------------------
    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound, whose gradient is this estimator's gradient estimate."""
        value, surrogate = self._objective(self._log_weights(model, guide, args, kwargs))
        return -(value.detach() + surrogate - surrogate.detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound, a float."""
        with torch.no_grad():
            value, _ = self._objective(self._log_weights(model, guide, args, kwargs))
        return -float(value)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The negative bound; its gradient estimate is accumulated into the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())

    def _objective(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError  # traces are taken by _log_weights, all particles at once

    # ----- the weights ------------------------------------------------------------------------
    def _log_weights(self, model, guide, args, kwargs) -> LogWeights:
        if not self._proposal_checked:  # on the first call: a point mass has no importance weights
            rng = get_rng_state()  # the check's draws leave the caller's random stream as it was
            traces = _check_traces(model, guide, args, kwargs)
            check_proposal(guide, traces[1], *args, **kwargs)
            set_rng_state(rng)
            self._proposal_checked = True
            if self.max_plate_nesting == float("inf"):
                self.max_plate_nesting = max_plate_nesting(*traces)
        dims = self.max_plate_nesting + 1  # the particle plate is the outermost dimension
        particles = pyro.plate(PARTICLE_PLATE, self.num_particles, dim=-dims)
        guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(particles(model), trace=guide_trace)).get_trace(*args, **kwargs)
        if is_validation_enabled():
            with warnings.catch_warnings():  # model sites the guide lacks are drawn from the prior
                warnings.filterwarnings("ignore", "Found vars in model but not guide")
                check_model_guide_match(model_trace, guide_trace, dims)
        model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        stopped = _stopped_log_q(guide_trace) if self.path_derivative else {}
        return Arrangement(model_trace, guide_trace, self.num_particles, dims, self.data_plate) \
            .weights(stopped)


def _check_traces(model, guide, args, kwargs) -> tuple[Trace, Trace]:
    guide_trace = trace(guide, *args, **kwargs)
    return trace(poutine.replay(model, trace=guide_trace), *args, **kwargs), guide_trace


def _stopped_log_q(guide_trace: Trace) -> dict[str, torch.Tensor]:
    """``log q(z; stop(phi))`` at the recorded draws, per reparameterised guide site.

    Each site's distribution is copied with its parameters detached
    (:func:`pyro.distributions.util.detach`), whatever mechanism produced them
    (``pyro.param``, ``pyro.module``, an encoder), and scored at the attached draw,
    so these log densities depend on the parameters only through the draws'
    paths. A guide whose factor for one site depends on another site's draw
    loses that path too: path-derivative estimators assume factors that depend
    on the data and the parameters only (mean-field and amortised guides).

    The point masses through which an autoguide hands its auxiliary draw ``u`` to
    the model (``Delta(T(u), log_density=-log|det dT/du|)``, ``T`` a fixed
    bijection) keep their log density attached: it depends on ``phi`` only through
    ``u``'s path, which is the gradient wanted.
    """
    return {name: scale_and_mask(detach(site["fn"]).log_prob(site["value"]), site["scale"], site["mask"])
            for name, site in latent_sites(guide_trace).items()
            if site["fn"].has_rsample and not is_point_mass(site["fn"])}


class Arrangement:
    """Sorts the sites of one particle trace pair into :class:`LogWeights`.

    ``dims`` counts the plate dimensions including the particles' (at ``-dims``).
    The weights are per observation when every draw of the proposal (each guide
    site, auxiliary ones included, and each model site drawn from its prior) lies
    inside the data plate and the sites outside it do not depend on the draws;
    otherwise one joint weight per particle (:attr:`LogWeights.joint`).
    Both traces must have their log densities computed (``compute_log_prob``).
    """

    def __init__(self, model_trace: Trace, guide_trace: Trace, num_particles: int, dims: int,
                 plate_name: str):
        self.model_trace, self.guide_trace = model_trace, guide_trace
        self.k, self.dims = num_particles, dims
        self.frame = _data_frame(model_trace, plate_name)
        self.width = 1 if self.frame is None else self.frame.size
        self.scale = 1.0 if self.frame is None else (self.frame.full_size or self.width) / self.width
        self.guide_latent = latent_sites(guide_trace)
        self.prior_drawn = {n: s for n, s in latent_sites(model_trace).items() if n not in self.guide_latent}
        self.outside_sites = sorted(name for name, site in {**self.prior_drawn, **self.guide_latent}.items()
                              if not self._inside(site))

    def _inside(self, site) -> bool:
        return self.frame is not None and any(f.name == self.frame.name for f in site["cond_indep_stack"])

    def reduce(self, site, log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inside, outside)`` parts of one site's log density (or any tensor of its batch shape):
        ``(K, b)`` and ``(K,)``."""
        log_p = log_p.reshape((1,) * max(self.dims - log_p.dim(), 0) + log_p.shape)
        if not self._inside(site):
            outside = log_p.reshape(log_p.shape[0], -1).sum(-1).expand(self.k)
            return log_p.new_zeros(self.k, self.width), outside
        keep = self.dims + self.frame.dim
        summed = [d for d in range(1, self.dims) if d != keep]
        if summed:  # (an empty list would make torch sum over every dimension)
            log_p = log_p.sum(summed, keepdim=True)
        inside = log_p.reshape(log_p.shape[0], log_p.shape[keep])
        return (inside / self.scale).expand(self.k, self.width), log_p.new_zeros(self.k)

    def model_parts(self, model_trace: Trace) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p(x, z_k)`` of every site of ``model_trace``, split ``(inside (K, b), outside (K,))``.

        ``model_trace`` is the arranged model's trace replayed, e.g. at other parameter
        values (log densities computed); sites drawn from the prior are included.
        """
        return self._total(self.reduce(site, site["log_prob"])
                           for site in model_trace.nodes.values() if site["type"] == "sample")

    def is_joint(self, outside: torch.Tensor) -> bool:
        """Whether the weights must be joint, given the summed log weight outside the data plate."""
        return self.frame is None or bool(self.outside_sites) or bool((outside != outside[:1]).any())

    def columns(self, parts: tuple[torch.Tensor, torch.Tensor], joint: bool, scale: float | None = None
                ) -> torch.Tensor:
        """``(inside, outside)`` as ``(K, b)`` columns, or as ``(K, 1)`` joint totals.

        A joint total scales the data plate's part by ``scale`` (default: ``n / b``).
        """
        inside, outside = parts
        if joint:
            return (outside + (self.scale if scale is None else scale) * inside.sum(-1)).unsqueeze(-1)
        return inside

    def parts(self, stopped: dict[str, torch.Tensor]):
        """The log weight, the score terms and the hooked draws, before the joint/per-observation choice.

        Returns ``(log_w, score, values)``: ``log_w`` and ``score`` as ``(inside (K, b),
        outside (K,))`` pairs; ``stopped`` replaces a guide site's log density.
        """
        log_w, score, values = [], [], []
        for name, site in self.model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name not in self.prior_drawn:
                log_w.append(self.reduce(site, site["log_prob"]))
            elif not site["fn"].has_rsample:  # drawn from the prior, which cancels from the weight
                score.append(self.reduce(site, site["log_prob"]))
        for name, site in self.guide_latent.items():
            inside, outside = self.reduce(site, stopped.get(name, site["log_prob"]))
            log_w.append((-inside, -outside))
            if not site["fn"].has_rsample:
                score.append(self.reduce(site, site["log_prob"]))
            elif site["value"].requires_grad and not is_point_mass(site["fn"]):
                values.append(site)  # a point mass's value is a function of a base draw, hooked there
        return self._total(log_w), self._total(score), values

    def weights(self, stopped: dict[str, torch.Tensor]) -> LogWeights:
        log_w, score, values = self.parts(stopped)
        joint = self.is_joint(log_w[1].detach())
        offset = log_w[0].new_zeros(()) if joint else log_w[1].mean()
        return LogWeights(self.columns(log_w, joint), self.columns(score, joint, scale=1.0),
                          1.0 if joint else self.scale, offset, self._hooks(values, joint), joint)

    def _total(self, parts) -> tuple[torch.Tensor, torch.Tensor]:
        inside, outside = torch.zeros(self.k, self.width), torch.zeros(self.k)
        for a, b in parts:
            inside, outside = inside + a, outside + b
        return inside, outside

    def _hooks(self, sites, joint: bool) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """Each reparameterised draw with the shape that lays a ``(K, b)`` tensor onto it."""
        placed = []
        for site in sites:
            value = site["value"]
            batch_dims = value.dim() - site["fn"].event_dim
            shape = [1] * value.dim()
            shape[batch_dims - self.dims] = self.k
            if not joint:
                shape[batch_dims + self.frame.dim] = self.width
            placed.append((value, tuple(shape)))
        return placed


def _data_frame(model_trace: Trace, plate_name: str):
    """The vectorised plate frame called ``plate_name``, or ``None``."""
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.name == plate_name and frame.vectorized:
                    return frame
    return None

r"""Adaptive importance sampling per observation by importance-weighted moment matching.

A proposal :math:`r_0` built from the guide (the Student-t of
:class:`~freqvi.infer.proposals.StudentTProposal`) keeps the guide's location and scale,
which for an amortised guide are off from each observation's posterior (the
amortisation gap): its weights :math:`w_{ik} = p(x_i, z_{ik}) / r_0(z_{ik} \mid x_i)` are
heavy-tailed where it is. :func:`adapt` moves each observation's Student-t to that
observation's posterior moments, estimated by self-normalised importance sampling from
pilot draws :math:`u_{ik}` of the current proposal on each site's base (unconstrained)
space, :math:`\bar w_{ik} = w_{ik} / \sum_j w_{ij}`,

.. math::

    m_i = \sum_k \bar w_{ik} u_{ik}, \qquad
    \Sigma_i = \sum_k \bar w_{ik} (u_{ik} - m_i)(u_{ik} - m_i)^\top = L_i L_i^\top,

(the covariance over a site's last event dimension, a variance for a site without one),
and draws :math:`t_\nu(m_i, L_i)` next. The first round moves only the location (a
covariance from the few effective draws of a poor first proposal is itself poor: on the
digits VAE, with pilots of ``K/4`` draws at ``K = 1000``, moving both at once left 6.4% of
the test images with :math:`\hat k > 0.7`, the location first 4.4%), later rounds the
location and the covariance. A move is kept for observation ``i`` only where its PSIS :math:`\hat k` (from
the new pilot draws) is below the current one (with fewer than 21 pilot draws
:math:`\hat k` cannot be estimated and nothing moves), as in
Paananen, Piironen, Bürkner and Vehtari (2021), "Implicitly adaptive importance
sampling", *Statistics and Computing* 31, and in the population Monte Carlo of Cappé,
Guillin, Marin and Robert (2004), *JCGS* 13. The estimate then draws ``K`` fresh draws
from the adapted proposal: the pilot draws are not reused, so given the adapted proposal
:math:`\frac1K \sum_k w_{ik}` is a plain, unbiased importance estimate of :math:`p(x_i)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyro.distributions as dist
import torch

from freqvi.infer.proposals import (
    AdaptiveStudentTProposal,
    MomentMatchedStudentT,
    Proposal,
    SiteStudentT,
    drawn_sites,
)


@dataclass
class Pilot:
    """One round of pilot draws of a proposal.

    :ivar log_w: log importance weights, shape ``(K, n)``, one column per observation.
    :ivar guide_traces: the proposal's traces of the draws, one per chunk of particles drawn at once
        (together ``K``), each over all ``n`` rows.
    :ivar pareto_k: PSIS :math:`\\hat k` of each column, shape ``(n,)`` (NaN where it cannot be estimated).
    """

    log_w: torch.Tensor
    guide_traces: list
    pareto_k: np.ndarray


@dataclass
class SiteDraws:
    """One site's pilot draws on its base space and the Student-t that drew them.

    :ivar value: the draws, the site's batch and event shape on the base space, the particles at
        ``particle`` (a batch index) and the observations at ``plate`` (a batch index).
    :ivar proposal: the Student-t, shapes as :class:`~freqvi.infer.proposals.SiteStudentT`'s.
    """

    value: torch.Tensor
    proposal: SiteStudentT
    particle: int
    plate: int


def adapt(settings: AdaptiveStudentTProposal, draw: Callable[[Proposal, int], Pilot], plate_dim: int,
          dims: int, num_samples: int) -> Proposal:
    """The proposal adapted to each observation (see the module), from pilot rounds of ``draw``.

    :param settings: the first Student-t's degrees of freedom, the pilot's size and rounds.
    :param draw: ``draw(proposal, k)``: ``k`` draws of ``proposal`` per observation, as a :class:`Pilot`.
    :param plate_dim: the data plate's ``dim``; ``dims``: the plate dimensions counting the particles'.
    :param num_samples: ``K``, the estimate's draws per observation (the pilot's size is a share of it).
    :returns: ``settings`` itself where it adapts nothing (``adaptations=0``), else a
        :class:`~freqvi.infer.proposals.MomentMatchedStudentT`.
    """
    if settings.adaptations == 0:
        return settings
    k = settings.pilot_size(num_samples)
    pilot = draw(settings, k)
    sites = _site_draws(pilot.guide_traces, settings.df, plate_dim, dims)
    for round_ in range(settings.adaptations):
        matched = {name: _matched(site, pilot.log_w, scale_too=round_ > 0) for name, site in sites.items()}
        trial = draw(MomentMatchedStudentT(matched, settings), k)
        better = torch.from_numpy(trial.pareto_k < pilot.pareto_k)  # NaN (not estimable) is no better
        moved = _site_draws(trial.guide_traces, settings.df, plate_dim, dims)
        sites = {name: _kept(better, moved[name], site) for name, site in sites.items()}
        pilot = Pilot(torch.where(better, trial.log_w, pilot.log_w), [],
                      np.where(better.numpy(), trial.pareto_k, pilot.pareto_k))
    return MomentMatchedStudentT({name: site.proposal for name, site in sites.items()}, settings)


def _site_draws(guide_traces: list, df: float, plate_dim: int, dims: int) -> dict[str, SiteDraws]:
    """Each drawn site's base-space draws (the chunks' joined) and the Student-t (a replaced Normal factor)
    that drew them."""
    chunks = [{name: _base_draws(site["fn"], site["value"], df, plate_dim, dims)
               for name, site in drawn_sites(tr).items()} for tr in guide_traces]
    return {name: replace(site, value=torch.cat([chunk[name].value for chunk in chunks], site.particle))
            for name, site in chunks[0].items()}


def _base_draws(fn, value: torch.Tensor, df: float, plate_dim: int, dims: int) -> SiteDraws:
    """Walks ``fn`` (wrappers around a Student-t) to its core, inverting transforms on ``value``."""
    event_dims = 0
    while not isinstance(fn, dist.StudentT | dist.MultivariateStudentT):
        if isinstance(fn, torch.distributions.TransformedDistribution):
            for transform in reversed(fn.transforms):
                value = transform.inv(value)
        elif isinstance(fn, torch.distributions.Independent):
            event_dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    event_dims += len(fn.event_shape)
    batch = value.dim() - event_dims
    particle = batch - dims
    loc = torch.broadcast_to(fn.loc, value.shape).select(particle, 0)
    if event_dims == 0:
        proposal = SiteStudentT(df, loc, scale=torch.broadcast_to(fn.scale, value.shape).select(particle, 0))
    else:
        tril = fn.scale_tril if len(fn.event_shape) else torch.diag_embed(fn.scale)
        tril = torch.broadcast_to(tril, (*value.shape, value.shape[-1])).select(particle, 0)
        proposal = SiteStudentT(df, loc, scale_tril=tril)
    return SiteDraws(value, proposal, particle, batch + plate_dim)


def _matched(site: SiteDraws, log_w: torch.Tensor, scale_too: bool = True) -> SiteStudentT:
    """The Student-t at the self-normalised weighted mean (and, with ``scale_too``, covariance) of the site's
    draws, per observation, in float64; where the weighted covariance is not positive definite (too few
    effective draws) or not finite, the current one."""
    shape = [1] * site.value.dim()
    shape[site.particle], shape[site.plate] = log_w.shape
    w = torch.softmax(log_w.double(), 0).reshape(shape)
    u = site.value.double()
    loc = (w * u).sum(site.particle)
    centred = u - loc.unsqueeze(site.particle)
    current, dtype = site.proposal, site.value.dtype
    if not scale_too:  # (no finite mean where every weight is zero)
        loc = torch.where(torch.isfinite(loc), loc, current.loc.double())
        return SiteStudentT(current.df, loc.to(dtype), current.scale, current.scale_tril)
    if current.scale_tril is None:
        scale = (w * centred.square()).sum(site.particle).sqrt()
        ok = torch.isfinite(scale) & (scale > 0)
        return SiteStudentT(current.df, torch.where(ok, loc, current.loc.double()).to(dtype),
                            scale=torch.where(ok, scale, current.scale.double()).to(dtype))
    cov = (w.unsqueeze(-1) * centred.unsqueeze(-1) * centred.unsqueeze(-2)).sum(site.particle)
    tril, info = torch.linalg.cholesky_ex(cov)
    ok = (info == 0) & torch.isfinite(tril).all(-1).all(-1)
    loc = torch.where(ok.unsqueeze(-1), loc, current.loc.double())
    tril = torch.where(ok[..., None, None], tril, current.scale_tril.double())
    return SiteStudentT(current.df, loc.to(dtype), scale_tril=tril.to(dtype))


def _kept(better: torch.Tensor, moved: SiteDraws, site: SiteDraws) -> SiteDraws:
    """Per observation, ``moved`` where ``better`` (shape ``(n,)``), else ``site``."""
    def pick(new: torch.Tensor | None, old: torch.Tensor | None, plate: int) -> torch.Tensor | None:
        if new is None:
            return None
        shape = [1] * new.dim()
        shape[plate] = -1
        return torch.where(better.reshape(shape), new, old)

    plate = site.plate - 1  # the proposal's tensors lack the particle dimension, left of the plate's
    proposal = SiteStudentT(site.proposal.df, pick(moved.proposal.loc, site.proposal.loc, plate),
                            pick(moved.proposal.scale, site.proposal.scale, plate),
                            pick(moved.proposal.scale_tril, site.proposal.scale_tril, plate))
    return SiteDraws(pick(moved.value, site.value, site.plate), proposal, site.particle, site.plate)

r"""Log weights of ``K`` draws per observation, all at once: the runs that give them and their summary.

Importance sampling (:func:`~freqvi.log_likelihood`) and annealed importance
sampling (:mod:`freqvi.infer.annealed`) both run a model/guide pair with a
particle plate of ``K`` elements left of every plate (:func:`on_rows`), sort the
two traces' log densities per observation
(:class:`~freqvi.estimators.particles.Arrangement`, via :func:`arrange`), and
reduce each observation's ``K`` log weights :math:`\log w_{ik}` to one estimate
of :math:`\log p(x_i)` with its standard error and effective sample size
(:func:`summarize`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from freqvi.estimators.particles import Arrangement
from freqvi.handlers import SubsamplePlate
from freqvi.traces import trace

#: The name of the particle plate that :func:`on_rows` adds.
PARTICLE_PLATE = "_num_samples"


def on_rows(program: Callable, plate: str, k: int, dims: int, rows: torch.Tensor | None = None) -> Callable:
    """``program`` under a plate of ``k`` particles at ``dim = -dims``, visiting ``rows`` of ``plate``.

    :param dims: the plate dimensions counting the particles' (the pair's plate nesting + 1).
    :param rows: indices of the data plate ``plate`` to visit (:class:`~freqvi.handlers.SubsamplePlate`),
        or ``None`` for the rows the plate itself visits.
    """
    program = pyro.plate(PARTICLE_PLATE, k, dim=-dims)(program)
    return program if rows is None else SubsamplePlate(plate, rows)(program)


def arrange(model: Callable, guide: Callable, data: tuple, k: int, dims: int, plate: str) -> Arrangement:
    """One run of ``guide``, ``model`` replayed on it, both with log densities, sorted per observation.

    ``model`` and ``guide`` already run with ``k`` particles (:func:`on_rows`); the
    guide may itself be a replay of given values (annealed importance sampling
    evaluates its chains' states that way).
    """
    guide_tr = trace(guide, *data)
    model_tr = prune_subsample_sites(trace(poutine.replay(model, trace=guide_tr), *data))
    guide_tr = prune_subsample_sites(guide_tr)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    return Arrangement(model_tr, guide_tr, k, dims, plate)


@dataclass
class WeightSummary:
    r"""Each column's estimate from its ``K`` log weights; every tensor has shape ``(b,)``, float64.

    :ivar log_mean: :math:`\log \frac1K \sum_k w_k`.
    :ivar standard_error: its delta-method standard error, :math:`\mathrm{sd}(w) / (\sqrt K\, \bar w)`
        (infinite for ``K = 1``).
    :ivar effective_sample_size: Kish's :math:`(\sum_k w_k)^2 / \sum_k w_k^2`, between 1 and ``K``.
    """

    log_mean: torch.Tensor
    standard_error: torch.Tensor
    effective_sample_size: torch.Tensor


def summarize(log_w: torch.Tensor) -> WeightSummary:
    """:class:`WeightSummary` of log weights ``(K, b)``: ``K`` draws of each of ``b`` columns."""
    k = log_w.shape[0]
    log_w = log_w.double()
    log_mean = torch.logsumexp(log_w, 0) - math.log(k)
    w = torch.exp(log_w - log_w.max(0).values)
    se = w.std(0, correction=1) / (math.sqrt(k) * w.mean(0)) if k > 1 else torch.full_like(log_mean, math.inf)
    return WeightSummary(log_mean, se, w.sum(0).square() / w.square().sum(0))

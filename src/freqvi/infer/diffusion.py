r"""Measuring a fitted diffusion model: its likelihood bound and the quality of its samples.

* :func:`diffusion_bound`: the full-chain ELBO on held-out data, with every one of the ``T``
  terms evaluated (no subsampling of t), as a negative log-likelihood bound in nats and
  bits per dimension.
* :func:`energy_distance`: a two-sample distance between model draws and held-out points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch

from freqvi.errors import FreqviInputError
from freqvi.estimators.time_subsampled import TimeSubsampledELBO
from freqvi.infer.pair import resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.validation import as_real, check_seed


@dataclass
class DiffusionBound:
    r"""The negative ELBO of held-out data, an upper bound on its negative log-likelihood.

    :ivar nats_per_dim: :math:`-\frac{1}{nd} \sum_i \mathrm{ELBO}(x_i)`, at least :math:`-\frac{1}{nd} \sum_i
        \log p(x_i)`.
    :ivar bits_per_dim: the same in bits (divided by :math:`\log 2`).
    :ivar standard_error: standard error of ``nats_per_dim`` over the observations (which
        includes the Monte-Carlo noise of the draws of :math:`x_t`).
    :ivar per_observation: :math:`-\mathrm{ELBO}(x_i)` in nats, shape ``(n,)``.
    """

    nats_per_dim: float
    bits_per_dim: float
    standard_error: float
    per_observation: torch.Tensor

    def __repr__(self) -> str:
        return (f"DiffusionBound: {self.nats_per_dim:.4f} nats per dimension "
                f"(s.e. {self.standard_error:.4f}), {self.bits_per_dim:.4f} bits per dimension: an upper "
                f"bound on the NLL of {len(self.per_observation)} observations")


@thread_policy
def diffusion_bound(model, data, *, guide=None, num_particles: int = 1, seed: int | None = None,
                    chunk_size: int = 64) -> DiffusionBound:
    r"""The full-chain negative ELBO of ``data`` ``(n, d)`` per dimension, in nats and bits.

    For each observation every term :math:`L_1, \dots, L_T` is evaluated at its own draw
    :math:`x_t \sim q(x_t \mid x_0)` (:class:`~freqvi.estimators.TimeSubsampledELBO` with
    ``time_sampling="all"``, ``num_particles`` draws averaged) and the prior term exactly;
    :math:`L_1 = -\mathbb E \log p_\theta(x_0 \mid x_1)` is the Gaussian decoder's, variance
    :math:`\sigma_1^2`, a density on :math:`\mathbb R^d`: for continuous data the bound is
    in nats of density (it can be negative) and compares with other densities on the same
    scale (not with discrete-data bits per dimension).

    :param model: a :class:`~freqvi.models.GaussianDiffusion` (its own guide is used), or a
        model callable with ``guide=`` (the two diffusion protocols).
    :param chunk_size: steps evaluated per denoiser call.
    """
    pair = resolve_pair(model, guide)
    x = as_real(data)
    seed = check_seed(seed)
    if x.dim() != 2:
        raise FreqviInputError(f"data must have shape (n_observations, dim); got {tuple(x.shape)}.")
    if seed is not None:
        pyro.set_rng_seed(seed)
    estimator = TimeSubsampledELBO(num_particles, "all", chunk_size=chunk_size)
    per_obs = estimator.per_observation(pair.model, pair.guide, x).double()
    d = x.shape[1]
    se = float(per_obs.std() / math.sqrt(len(per_obs))) / d if len(per_obs) > 1 else math.inf
    nats = float(per_obs.mean()) / d
    return DiffusionBound(nats, nats / math.log(2), se, per_obs)


def gaussian_nll_per_dim(train, test) -> float:
    r"""The baseline: held-out NLL per dimension of the maximum-likelihood Gaussian of ``train``.

    :math:`-\frac{1}{nd} \sum_i \log \mathcal N(y_i; \bar x, S)`, with :math:`\bar x` and :math:`S`
    (divisor ``m``) from ``train`` ``(m, d)`` and :math:`y_i` the rows of ``test`` ``(n, d)``; float64.
    Raises :class:`~freqvi.errors.FreqviInputError` if :math:`S` is singular.
    """
    train, test = as_real(train, "train").double(), as_real(test, "test").double()
    d = train.shape[1]
    covariance = torch.cov(train.T, correction=0).reshape(d, d)
    factor, info = torch.linalg.cholesky_ex(covariance)
    if info:
        raise FreqviInputError("the maximum-likelihood Gaussian of the training data is degenerate (its "
                               "covariance is singular, e.g. a constant column); no density to compare with.")
    law = torch.distributions.MultivariateNormal(train.mean(0), scale_tril=factor)
    return float(-law.log_prob(test).mean()) / train.shape[1]


def energy_distance(x, y) -> float:
    r"""The energy distance between samples ``x`` ``(m, d)`` and ``y`` ``(k, d)`` (Szekely and Rizzo 2004).

    .. math::

        \hat{\mathcal E} = \frac{2}{mk} \sum_{i,j} \|x_i - y_j\|
            - \frac{1}{m^2} \sum_{i,i'} \|x_i - x_{i'}\| - \frac{1}{k^2} \sum_{j,j'} \|y_j - y_{j'}\|,

    the plug-in (V-statistic) estimate of :math:`2 \mathbb E\|X - Y\| - \mathbb E\|X - X'\| -
    \mathbb E\|Y - Y'\|`, which is zero if and only if the laws agree. The plug-in estimate is
    never negative; between two samples of one law it is of order ``1/m + 1/k`` (the noise
    floor to compare with). Computed in float64.
    """
    x, y = as_real(x, "x").double(), as_real(y, "y").double()
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise FreqviInputError(f"x and y must be non-empty (n, d) arrays of one d; got {tuple(x.shape)} "
                               f"and {tuple(y.shape)}.")
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())

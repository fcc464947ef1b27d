r"""Shared machinery of the diffusion estimators: the ELBO of a Gaussian diffusion, term by term.

For the latent chain :math:`x_{1:T}` of paper section 6, with the guide the forward chain
:math:`q` and the model :math:`p(x_T) = \mathcal N(0, I)`,
:math:`p_\theta(x_{t-1} \mid x_t) = \mathcal N(\mu_\theta(x_t, t), \sigma_t^2 I)`, the negative
ELBO of one observation :math:`x_0 \in \mathbb R^d` is a sum of ``T + 1`` terms,

.. math::

    -\mathrm{ELBO}(x_0) = \sum_{t=1}^T L_t + \mathrm{KL}(q(x_T \mid x_0) \,\|\, p(x_T)), \qquad
    L_t = \mathbb E_{q(x_t \mid x_0)} \Bigl[c_t + \frac{\|\tilde\mu_t(x_t, x_0) - \mu_\theta(x_t, t)\|^2}
        {2 \sigma_t^2}\Bigr],

where for :math:`t \ge 2` the bracket is the Gaussian
:math:`\mathrm{KL}(q(x_{t-1} \mid x_t, x_0) \,\|\, p_\theta(x_{t-1} \mid x_t))`, with
:math:`c_t = \frac d2 (\log \frac{\sigma_t^2}{\tilde\beta_t} + \frac{\tilde\beta_t}{\sigma_t^2} - 1)`,
and for :math:`t = 1` it is the decoder's :math:`-\log p_\theta(x_0 \mid x_1)`, with
:math:`c_1 = \frac d2 \log(2 \pi \sigma_1^2)` (:math:`\tilde\mu_1 = x_0`, the posterior at
``t = 1`` being the point mass at ``x_0``). With :math:`v = 1 - \bar\alpha_T`, the prior term is
:math:`\frac12 \bar\alpha_T \|x_0\|^2 + \frac d2 (v - 1 - \log v)`. So

.. math::

    -\mathrm{ELBO}(x_0) = C + \tfrac12 \bar\alpha_T \|x_0\|^2 + \sum_{t=1}^T \mathbb E\, Q_t, \qquad
    C = \sum_{t=1}^T c_t + \tfrac d2 (v - 1 - \log v),

with :math:`Q_t` the quadratic term: the constants do not depend on the draws (nor on
:math:`\theta`: the variances :math:`\sigma_t^2` are fixed), so the estimators compute them
once, exactly, in float64, and estimate only the quadratic terms.

The estimators read these closed forms off the model/guide pair itself, through two small
protocols: :class:`ReverseProcess` (the model's :math:`\mu_\theta`, :math:`\sigma_t^2`) and
:class:`ForwardProcess` (the guide's :math:`q(x_t \mid x_0)` and :math:`q(x_{t-1} \mid x_t, x_0)`).
:class:`~freqvi.models.GaussianDiffusion` and its guide implement them; so can a user's pair.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import pyro
import torch
from pyro.infer import ELBO

from freqvi.errors import FreqviInputError


@runtime_checkable
class ReverseProcess(Protocol):
    r"""What the time-subsampled estimators need from a diffusion *model*.

    Given ``model``, the estimators use ``model.__self__`` (the object whose bound method
    the model program is) or ``model`` itself. Steps ``t`` are integer tensors of shape
    ``x_t.shape[:-1]``; :math:`p(x_T)` is :math:`\mathcal N(0, I)`.
    """

    data_plate: str
    num_steps: int

    def prepare(self, x: torch.Tensor) -> None:
        """Validates the visited observations ``(b, d)`` (raising ``FreqviInputError``)."""

    def reverse_mean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\mu_\theta(x_t, t)`, shape of ``x_t``, recording its parameters (``pyro.module``)."""

    def reverse_variance(self, t: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        r""":math:`\sigma_t^2`, shape of ``t``."""

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\epsilon_\theta(x_t, t)`, shape of ``x_t`` (for the noise-prediction loss)."""


@runtime_checkable
class ForwardProcess(Protocol):
    r"""What the time-subsampled estimators need from a diffusion *guide*: its closed forms."""

    num_steps: int

    def marginal(self, t: torch.Tensor | int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\sqrt{\bar\alpha_t}, 1 - \bar\alpha_t)`, the moments of :math:`q(x_t \mid x_0)`."""

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon`."""

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\tilde\mu_t(x_t, x_0)`."""

    def posterior_variance(self, t: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        r""":math:`\tilde\beta_t`."""


def diffusion_pair(model, guide) -> tuple[ReverseProcess, ForwardProcess]:
    """The objects behind a diffusion model/guide pair, checked against the two protocols."""
    reverse = getattr(model, "__self__", model)
    if not isinstance(reverse, ReverseProcess):
        raise FreqviInputError(
            "the diffusion estimators need a diffusion model: the model method of a "
            "freqvi.models.GaussianDiffusion, or of an object with the ReverseProcess protocol "
            f"(freqvi.estimators.ReverseProcess); got {type(reverse).__name__}. For other models "
            "use a general estimator such as 'trace'.")
    if not isinstance(guide, ForwardProcess):
        raise FreqviInputError(
            "the diffusion estimators need the forward noising chain as the guide (a "
            "GaussianDiffusion's .guide, or an object with the ForwardProcess protocol); got "
            f"{type(guide).__name__}.")
    if reverse.num_steps != guide.num_steps:
        raise FreqviInputError(f"the model has T = {reverse.num_steps} steps, the guide "
                               f"{guide.num_steps}.")
    return reverse, guide


def step_constants(reverse: ReverseProcess, forward: ForwardProcess, data_dim: int) -> torch.Tensor:
    r""":math:`c_1, \dots, c_T`, float64 ``(T,)``: the parts of the terms that do not depend on the draws."""
    t = torch.arange(1, forward.num_steps + 1)
    s2 = reverse.reverse_variance(t, torch.float64)
    v = forward.posterior_variance(t, torch.float64)
    kl = (s2 / v.clamp_min(torch.finfo(torch.float64).tiny)).log() + v / s2 - 1
    return 0.5 * data_dim * torch.where(t == 1, (2 * math.pi * s2).log(), kl)


def chain_constants(reverse: ReverseProcess, forward: ForwardProcess, data_dim: int) -> tuple[float, float]:
    r""":math:`(C, \frac12 \bar\alpha_T)`: :math:`-\mathrm{ELBO}(x_0) = C + \frac12 \bar\alpha_T \|x_0\|^2
    + \sum_t \mathbb E Q_t` (module docstring), in float64."""
    mean, v = forward.marginal(forward.num_steps, torch.float64)
    prior = 0.5 * data_dim * (v - 1 - v.log())
    return float(step_constants(reverse, forward, data_dim).sum() + prior), float(0.5 * mean.square())


def quadratic_terms(reverse: ReverseProcess, forward: ForwardProcess, x0: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor) -> torch.Tensor:
    r""":math:`Q_t = \|\tilde\mu_t - \mu_\theta(x_t, t)\|^2 / (2 \sigma_t^2)` per row, ``(b,)``.

    At :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t} \epsilon`; ``x0``, ``eps``
    ``(b, d)``, ``t`` ``(b,)``.
    """
    x_t = forward.q_sample(x0, t, eps)
    diff = forward.posterior_mean(x0, x_t, t) - reverse.reverse_mean(x_t, t)
    return diff.square().sum(-1) / (2 * reverse.reverse_variance(t, x0.dtype))


class DiffusionObjective(ELBO):
    """Base of the diffusion estimators: a per-observation objective summed over the data plate.

    A subclass implements ``_per_observation``, mapping the visited observations
    ``x0`` ``(b, d)`` to a differentiable ``(b,)`` tensor whose sum is the estimator's loss
    (for the ELBO estimators: a draw of each row's negative ELBO). The rows are those the
    model's data plate visits (so :func:`freqvi.fit`'s minibatches apply) and the sum is
    scaled by ``n / b`` as Pyro scales the plate's sites. With ``num_particles = K`` each row
    gets ``K`` independent draws, averaged.

    :param num_particles: ``K``, draws per observation (vectorised: the rows repeated ``K`` times).
    """

    def __init__(self, num_particles: int = 1):
        # vectorize_particles=False in Pyro's sense: no particle plate is ever put around the pair (the
        # closed forms run on repeated rows), so drivers need not check that the pair broadcasts over one,
        # a second run of the whole T-step chain before a fit's first step
        super().__init__(num_particles=num_particles, vectorize_particles=False)
        self._pair_key: tuple = ()
        self._constants: dict[int, tuple[float, float]] = {}

    def _pair(self, model, guide) -> tuple[ReverseProcess, ForwardProcess]:
        """:func:`diffusion_pair`, checked once per pair, with its cached constants. By equality, not
        identity: each read of ``diffusion.model`` makes a new bound method, equal to the last."""
        if not self._pair_key or self._pair_key[0] != model or self._pair_key[1] != guide:
            self._pair_key = (model, guide, *diffusion_pair(model, guide))
            self._constants = {}
        return self._pair_key[2:]

    def _chain_constants(self, reverse: ReverseProcess, forward: ForwardProcess,
                         data_dim: int) -> tuple[float, float]:
        """:func:`chain_constants` for this pair, computed once per data dimension."""
        if data_dim not in self._constants:
            self._constants[data_dim] = chain_constants(reverse, forward, data_dim)
        return self._constants[data_dim]

    def _per_observation(self, reverse: ReverseProcess, forward: ForwardProcess,
                         x0: torch.Tensor) -> torch.Tensor:
        """Each subclass's estimate per observation, shape ``(b,)``; the base class sums and scales it."""
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError  # no traces: the closed forms replace them

    def _scaled_sum(self, model, guide, x: torch.Tensor) -> torch.Tensor:
        reverse, forward = self._pair(model, guide)
        with pyro.plate(reverse.data_plate, x.shape[0]) as i:
            x0 = x[i]
        reverse.prepare(x0)
        scale = x.shape[0] / (x0.shape[0] * self.num_particles)
        if self.num_particles > 1:
            x0 = x0.repeat(self.num_particles, 1)
        return scale * self._per_observation(reverse, forward, x0).sum()

    def per_observation(self, model, guide, x: torch.Tensor) -> torch.Tensor:
        """The objective of each row of ``x`` ``(n, d)``, shape ``(n,)``, mean of ``K`` draws; no gradient."""
        reverse, forward = self._pair(model, guide)
        reverse.prepare(x)
        with torch.no_grad():
            rows = self._per_observation(reverse, forward, x.repeat(self.num_particles, 1))
        return rows.reshape(self.num_particles, x.shape[0]).mean(0)

    def differentiable_loss(self, model, guide, x: torch.Tensor) -> torch.Tensor:
        """The loss as a tensor that carries the estimator's gradient."""
        return self._scaled_sum(model, guide, x)

    def loss(self, model, guide, x: torch.Tensor) -> float:
        """The loss, a float (no gradient)."""
        with torch.no_grad():
            return float(self._scaled_sum(model, guide, x))

    def loss_and_grads(self, model, guide, x: torch.Tensor) -> float:
        """The loss; its gradient is accumulated into the model's parameters."""
        loss = self._scaled_sum(model, guide, x)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())

r"""The noise schedule of a Gaussian diffusion: :math:`\beta_1, \dots, \beta_T` and what follows from them.

A small object of its own, separate from the denoising network and from any
sampler (as diffusers separates its schedulers), shared by the model (the
reverse chain) and the guide (the forward noising chain). Every coefficient is
computed once in float64 and cast on request (paper section 6):

.. math::

    \alpha_t = 1 - \beta_t, \qquad \bar\alpha_t = \prod_{s \le t} \alpha_s, \qquad
    q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\, x_0, (1 - \bar\alpha_t) I),

    q(x_{t-1} \mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t I), \quad
    \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t} x_0
        + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t} x_t, \quad
    \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t} \beta_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freqvi.errors import FreqviInputError
from freqvi.validation import check_choice, check_finite, check_positive_float, check_positive_int

#: The named schedules of :meth:`~freqvi.models.NoiseSchedule.named`.
SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class ScheduleTable:
    r"""The schedule's coefficients in one dtype, each of shape ``(T + 1,)`` and indexed by ``t = 0..T``.

    Entry ``t = 0`` is the empty step: :math:`\beta_0 = 0`, :math:`\bar\alpha_0 = 1`,
    posterior coefficients 0 (no posterior before ``x_0``). At ``t = 1`` the posterior
    is the point mass at ``x_0``: ``posterior_x0[1] = 1``, ``posterior_xt[1] = 0``,
    ``posterior_variance[1] = 0``.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    posterior_x0: torch.Tensor
    posterior_xt: torch.Tensor
    posterior_variance: torch.Tensor


class NoiseSchedule:
    r"""Variances :math:`\beta_1, \dots, \beta_T \in (0, 1)` of the forward noising steps.

    :param betas: the ``T >= 1`` variances, a 1-D array-like, each strictly inside ``(0, 1)``.
    """

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone()
        if betas.dim() != 1 or len(betas) < 1:
            raise FreqviInputError(
                f"a noise schedule needs T >= 1 variances beta_1..beta_T in a 1-D array; got shape "
                f"{tuple(betas.shape)}.")
        check_finite(betas, "the schedule's betas")
        bad = (betas <= 0) | (betas >= 1)
        if bad.any():
            t = int(bad.nonzero()[0]) + 1
            raise FreqviInputError(
                f"every beta_t must lie strictly inside (0, 1); beta_{t} = {float(betas[t - 1]):.6g}.")
        self._table = _coefficients(betas)
        self._cast: dict[torch.dtype, ScheduleTable] = {torch.float64: self._table}

    @classmethod
    def linear(cls, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        r""":math:`\beta_t` evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020 with T = 1000).

        For few steps (say T = 10) the defaults leave :math:`\bar\alpha_T` near 1, far from
        the prior N(0, I); larger ends suit such chains.
        """
        num_steps = check_positive_int(num_steps, "num_steps")
        return cls(torch.linspace(check_positive_float(beta_start, "beta_start"),
                                  check_positive_float(beta_end, "beta_end"), num_steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        r"""Nichol and Dhariwal's (2021) schedule: :math:`\bar\alpha_t = f(t) / f(0)`,
        :math:`f(t) = \cos^2\bigl(\frac{t / T + s}{1 + s} \frac\pi2\bigr)`, :math:`s` = ``offset``,
        each :math:`\beta_t = 1 - \bar\alpha_t / \bar\alpha_{t-1}` capped at ``max_beta``."""
        num_steps = check_positive_int(num_steps, "num_steps")
        s = check_positive_float(offset, "offset")
        f = torch.cos((torch.arange(num_steps + 1, dtype=torch.float64) / num_steps + s) / (1 + s)
                      * math.pi / 2).square()
        return cls((1 - f[1:] / f[:-1]).clamp(max=max_beta))

    @classmethod
    def named(cls, name: str, num_steps: int) -> NoiseSchedule:
        """The schedule called ``name`` (one of :data:`.SCHEDULES`) with its default settings."""
        return getattr(cls, check_choice(name, "schedule", SCHEDULES))(num_steps)

    @property
    def num_steps(self) -> int:
        """``T``."""
        return len(self._table.betas) - 1

    def table(self, dtype: torch.dtype = torch.float64) -> ScheduleTable:
        """The coefficients cast to ``dtype`` (cast once, then cached; the schedule never changes)."""
        if dtype not in self._cast:
            self._cast[dtype] = ScheduleTable(*(v.to(dtype) for v in vars(self._table).values()))
        return self._cast[dtype]

    def __repr__(self) -> str:
        b = self._table.betas
        return f"NoiseSchedule(T={self.num_steps}, beta_1={float(b[1]):.3g}, beta_T={float(b[-1]):.3g})"


def _coefficients(betas: torch.Tensor) -> ScheduleTable:
    """The float64 table of :class:`ScheduleTable` from ``beta_1..beta_T``."""
    betas = torch.cat([betas.new_zeros(1), betas])
    alphas = 1 - betas
    abar = torch.log1p(-betas).cumsum(0).exp()
    one_minus = -torch.log1p(-betas).cumsum(0).expm1()  # 1 - abar_t without cancellation
    one_minus[0] = 1  # (t = 0 has no posterior; avoids 0 / 0)
    x0 = abar.roll(1).sqrt() * betas / one_minus
    xt = alphas.sqrt() * one_minus.roll(1) / one_minus
    variance = one_minus.roll(1) / one_minus * betas
    x0[:2], xt[:2], variance[:2] = torch.tensor([0.0, 1.0]), 0.0, 0.0  # t = 1: the point mass at x_0
    return ScheduleTable(betas, alphas, abar, x0, xt, variance)

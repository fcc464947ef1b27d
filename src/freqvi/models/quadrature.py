"""Adaptive Gauss-Hermite quadrature of many independent one-dimensional log-integrands at once."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from numpy.polynomial.hermite import hermgauss

Derivatives = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@functools.lru_cache
def _hermite_rule(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``t_k`` and ``log w_k + t_k^2`` of the ``num_nodes``-point Gauss-Hermite rule."""
    nodes, weights = hermgauss(num_nodes)
    return nodes, np.log(weights) + nodes**2


def concave_mode(derivatives: Derivatives, lower: torch.Tensor, upper: torch.Tensor,
                 max_steps: int = 100, rtol: float = 1e-12) -> torch.Tensor:
    r"""The maximiser of each of many strictly concave functions ``f``, by safeguarded Newton.

    ``f'`` is decreasing, so its root lies in a bracket ``[lower, upper]`` that
    every evaluation narrows. A Newton step :math:`u - f'(u) / f''(u)` that lands
    outside the bracket is replaced by the bisection of the bracket (Numerical
    Recipes' ``rtsafe``): convergence is guaranteed, and quadratic near the root.

    :param derivatives: ``u -> (f'(u), f''(u))``, elementwise, shapes of ``u``.
    :param lower: points with ``f' >= 0``, shape ``(m,)``.
    :param upper: points with ``f' <= 0``, shape ``(m,)``.
    :param rtol: stop when every step is below ``rtol * (1 + |u|)``.
    """
    u = (lower + upper) / 2
    for _ in range(max_steps):
        slope, curvature = derivatives(u)
        lower = torch.where(slope > 0, u, lower)
        upper = torch.where(slope < 0, u, upper)
        newton = u - slope / curvature
        inside = (newton >= lower) & (newton <= upper)
        step = torch.where(inside, newton, (lower + upper) / 2) - u
        u = u + step
        if (step.abs() <= rtol * (1 + u.abs())).all():
            break
    return u


def log_integral(log_f: Callable[[torch.Tensor], torch.Tensor], centre: torch.Tensor,
                 scale: torch.Tensor, num_nodes: int) -> torch.Tensor:
    r"""Gauss-Hermite rule for :math:`\log \int e^{f_i(u)}\,du`, centred at ``c_i`` with scale ``s_i``.

    .. math::

        \log \int e^{f(u)}\,du \approx \log(\sqrt2\, s)
        + \operatorname{logsumexp}_k \big[\log w_k + t_k^2 + f(c + \sqrt2\, s\, t_k)\big],

    exact when :math:`e^{f(u) + (u - c)^2 / 2s^2}` is a polynomial of degree below
    ``2 * num_nodes``.

    :param log_f: ``u -> f(u)``, elementwise in the last dimension: ``(Q, m) -> (Q, m)``.
    :param centre: ``c``, shape ``(m,)``.
    :param scale: ``s > 0``, shape ``(m,)``.
    :returns: shape ``(m,)``.
    """
    nodes, log_weights = (torch.as_tensor(a, dtype=centre.dtype).unsqueeze(-1)
                          for a in _hermite_rule(num_nodes))
    u = centre + math.sqrt(2) * scale * nodes  # (Q, m)
    return torch.logsumexp(log_weights + log_f(u), 0) + torch.log(math.sqrt(2) * scale)


def adaptive_gauss_hermite(log_f: Callable[[torch.Tensor], torch.Tensor], derivatives: Derivatives,
                           lower: torch.Tensor, upper: torch.Tensor, num_nodes: int) -> torch.Tensor:
    r"""Adaptive Gauss-Hermite quadrature (Liu and Pierce 1994) of strictly concave log-integrands.

    Centres the rule of :func:`log_integral` at the mode :math:`\hat u_i` of
    :math:`f_i` and scales it by the curvature there, :math:`s_i = (-f_i''(\hat
    u_i))^{-1/2}`: the rule is then exact for a Gaussian integrand (the Laplace
    approximation is its one-node case). The centre and scale are computed without
    gradient: with them held fixed the rule is still a quadrature rule, so its
    derivatives in the parameters of ``f`` are the same rule applied to the
    derivatives of :math:`e^f`, accurate to the quadrature error.

    :param log_f: ``u -> f(u)`` as in :func:`log_integral`.
    :param derivatives: ``u -> (f'(u), f''(u))`` for ``u`` of shape ``(m,)``.
    :param lower: points below every mode, shape ``(m,)``.
    :param upper: points above every mode, shape ``(m,)``.
    :returns: :math:`\log \int e^{f_i(u)}\,du`, shape ``(m,)``.
    """
    with torch.no_grad():
        mode = concave_mode(derivatives, lower, upper)
        scale = (-derivatives(mode)[1]).rsqrt()
    return log_integral(log_f, mode, scale, num_nodes)

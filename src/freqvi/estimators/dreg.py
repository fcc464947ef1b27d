"""The importance-weighted bound with doubly-reparameterised guide gradients (DReG)."""

from __future__ import annotations

import torch

from freqvi.estimators.iwae import score_function_term
from freqvi.estimators.particles import LogWeights, ParticleELBO


class DReG_ELBO(ParticleELBO):
    r"""The IWAE bound with the doubly-reparameterised guide gradient of Tucker et al. (2019).

    The value is the bound of :class:`~freqvi.estimators.IWAE_ELBO`,
    :math:`\sum_i \log \frac1K \sum_k w_{ik}`. The model's gradient is IWAE's,
    :math:`\sum_k \tilde w_{ik} \nabla_\theta \log w_{ik}`. The guide's is

    .. math::

        \nabla_\phi \mathcal L_K \approx \sum_i \sum_k \tilde w_{ik}^2\,
            \frac{\partial \log w_{ik}}{\partial z_{ik}}
            \frac{\partial z_{ik}(\epsilon_{ik}, \phi)}{\partial \phi},

    with :math:`\log q` taken at stopped parameters: it has the expectation of
    IWAE's guide gradient and a variance that does not swamp its signal as ``K``
    grows. Computed as the surrogate :math:`\sum_k \mathrm{stop}(\tilde w_{ik})
    \log w_{ik}` with a hook that multiplies the gradient reaching each draw
    :math:`z_{ik}` by :math:`\tilde w_{ik}` once more. Draws that are not
    reparameterisable keep IWAE's estimator.

    :param num_particles: ``K``.
    :param max_plate_nesting: as in :class:`~freqvi.estimators.IWAE_ELBO`.
    :param data_plate: name of the plate over observations.
    """

    path_derivative = True
    traceable = False  # the hooks on the draws would not be part of a traced graph

    def _objective(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        bound = weights.log_mean_weight()
        value = weights.total(bound)
        normalised = torch.softmax(weights.log_w.detach(), 0)  # (K, b)
        if torch.is_grad_enabled():
            for draw, shape in weights.values:
                draw.register_hook(_multiply_by(normalised.reshape(shape)))
        surrogate = weights.total((normalised * weights.log_w).sum(0))
        return value, surrogate + score_function_term(weights, bound)


def _multiply_by(factor: torch.Tensor):
    return lambda grad: grad * factor

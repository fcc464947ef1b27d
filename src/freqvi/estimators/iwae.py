"""The importance-weighted bound (IWAE)."""

from __future__ import annotations

import torch

from freqvi.estimators.particles import LogWeights, ParticleELBO


class IWAE_ELBO(ParticleELBO):
    r"""The importance-weighted bound of Burda, Grosse and Salakhutdinov (2016).

    .. math::

        \mathcal L_K(\theta, \phi) = \sum_i \mathbb E_{z_{i1..iK} \sim q_\phi}
            \Bigl[\log \frac1K \sum_{k=1}^K w_{ik}\Bigr], \qquad
        w_{ik} = \frac{p_\theta(x_i, z_{ik})}{q_\phi(z_{ik} \mid x_i)}.

    :math:`\mathcal L_1` is the ELBO; :math:`\mathcal L_K` increases with ``K``
    and tends to :math:`\ell(\theta) = \sum_i \log p_\theta(x_i)`. Each
    observation gets its own ``K`` draws (vectorised in one particle plate), so
    the bound is per observation when every latent site lies in the data plate;
    otherwise the weights of all observations are multiplied first (one joint
    bound). A subsampled data plate scales the sum by :math:`n / b`, which keeps
    the estimate unbiased for :math:`\mathcal L_K`.

    Gradient: the unbiased estimate :math:`\sum_k \tilde w_{ik} \nabla \log w_{ik}`,
    :math:`\tilde w_{ik} = w_{ik} / \sum_j w_{ij}`, through reparameterised draws;
    for draws that are not reparameterisable the score-function term
    :math:`\mathcal L_{K,i} \sum_k \nabla \log q(z_{ik})` is added. Its signal
    for the guide fades as ``K`` grows (Rainforth et al. 2018); see
    :class:`~freqvi.estimators.DReG_ELBO`.

    :param num_particles: ``K``.
    :param max_plate_nesting: plates nested in model and guide (the particle
        plate not counted); guessed from one run if infinite.
    :param data_plate: name of the plate over observations.
    """

    def _objective(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        bound = weights.log_mean_weight()
        value = weights.total(bound)
        return value, value + score_function_term(weights, bound)


def score_function_term(weights: LogWeights, per_column: torch.Tensor) -> torch.Tensor:
    r"""Surrogate of :math:`\sum_i f_i \sum_k \nabla \log q(z_{ik})` for non-reparameterised draws.

    ``per_column`` holds :math:`f_i`, shape ``(b,)`` or ``(K, b)``; it is detached.
    """
    if not weights.score.requires_grad:
        return weights.score.new_zeros(())
    return weights.scale * (per_column.detach() * weights.score).sum() \
        / (1 if per_column.dim() == 1 else weights.score.shape[0])

"""The "sticking the landing" ELBO: path-derivative guide gradients."""

from __future__ import annotations

import torch

from freqvi.estimators.iwae import score_function_term
from freqvi.estimators.particles import LogWeights, ParticleELBO


class STL_ELBO(ParticleELBO):
    r"""The ELBO with the path-derivative gradient of Roeder, Wu and Duvenaud (2017).

    .. math::

        \mathrm{ELBO}(\theta, \phi) = \sum_i \mathbb E_{q_\phi}\bigl[\log p_\theta(x_i, z_i)
            - \log q_\phi(z_i \mid x_i)\bigr],

    estimated with ``K`` vectorised draws per observation, as
    :class:`~pyro.infer.Trace_ELBO` does. The guide's gradient drops the score
    term :math:`-\nabla_\phi \log q_\phi(z)` at fixed :math:`z`, whose expectation
    is zero: :math:`\log q` is taken at stopped parameters, so only the path
    :math:`z(\epsilon, \phi)` carries gradient. The estimate stays unbiased, and
    when the guide family contains the exact posterior its variance vanishes at
    the optimum (where :math:`\log p(x, z) - \log q(z)` is constant in ``z``).
    The model's gradient is the usual one. Draws that are not reparameterisable
    get the score-function estimator.

    :param num_particles: ``K``.
    :param max_plate_nesting: as in :class:`~freqvi.estimators.IWAE_ELBO`.
    :param data_plate: name of the plate over observations.
    """

    path_derivative = True

    def _objective(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        elbo = weights.total(weights.log_w.mean(0))
        return elbo, elbo + score_function_term(weights, weights.log_w)

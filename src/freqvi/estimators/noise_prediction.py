"""The "simple" noise-prediction loss of Ho et al. (2020): a reweighted diffusion ELBO, not a bound."""

from __future__ import annotations

import torch

from freqvi.estimators.diffusion import DiffusionObjective, ForwardProcess, ReverseProcess
from freqvi.validation import check_positive_int


class NoisePredictionLoss(DiffusionObjective):
    r"""Ho et al.'s (2020) objective :math:`L_\mathrm{simple}`: the squared error of the predicted noise.

    .. math::

        L_\mathrm{simple}(x_0) = \mathbb E_{t \sim U\{1..T\},\, \epsilon \sim \mathcal N(0, I)}
            \|\epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon, t)\|^2,

    one draw of ``(t, eps)`` per observation, summed over the data plate (scaled by ``n / b``).
    In the noise parameterisation the ``t``-th term of the negative ELBO is
    :math:`c_t + w_t \mathbb E \|\epsilon - \epsilon_\theta\|^2` with
    :math:`w_t = \beta_t^2 / (2 \sigma_t^2 \alpha_t (1 - \bar\alpha_t))` (paper section 6), so
    :math:`L_\mathrm{simple}` is the ELBO's data-dependent part with every weight :math:`w_t`
    replaced by :math:`1/T`: a *reweighting* that favours large ``t`` and trains good samplers,
    but neither a bound on the log-likelihood nor its gradient. Its value is reported as
    the "loss" (:func:`freqvi.fit` records minus it as ``elbo``, which it is not); measure
    the bound with :class:`~freqvi.estimators.TimeSubsampledELBO` instead.

    Like the ELBO estimators it reads :math:`\epsilon_\theta` and :math:`q(x_t \mid x_0)` off the
    model/guide pair (:class:`~freqvi.estimators.diffusion.ReverseProcess`,
    :class:`~freqvi.estimators.diffusion.ForwardProcess`) and costs one denoiser call per row.

    :param num_particles: draws of ``(t, eps)`` per observation.
    """

    def __init__(self, num_particles: int = 1):
        super().__init__(check_positive_int(num_particles, "num_particles"))

    def _per_observation(self, reverse: ReverseProcess, forward: ForwardProcess,
                         x0: torch.Tensor) -> torch.Tensor:
        t = torch.randint(1, forward.num_steps + 1, x0.shape[:-1])
        eps = torch.randn_like(x0)
        return (eps - reverse.predict_noise(forward.q_sample(x0, t, eps), t)).square().sum(-1)

"""How noisy an estimator's gradients are, on the user's own model and guide."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO

from freqvi.estimators.registry import get_estimator
from freqvi.validation import as_data, check_positive_int


@dataclass
class GradientMoments:
    r"""Moments of one parameter's stochastic ELBO gradient over independent draws.

    :ivar owner: ``"model"`` (theta) or ``"guide"`` (phi).
    :ivar mean: :math:`\bar g`, the average gradient of the ELBO with respect to the
        unconstrained parameter, elementwise (the parameter's shape).
    :ivar variance: the unbiased sample variance of the draws, elementwise.
    :ivar num_draws: how many independent gradient estimates were drawn.
    """

    owner: str
    mean: torch.Tensor
    variance: torch.Tensor
    num_draws: int

    @property
    def snr(self) -> torch.Tensor:
        r"""Signal-to-noise ratio :math:`|\bar g| / \mathrm{sd}(g)`, elementwise (Rainforth et al. 2018)."""
        return self.mean.abs() / self.variance.sqrt()

    @property
    def standard_error(self) -> torch.Tensor:
        """Monte-Carlo standard error of ``mean``, elementwise."""
        return (self.variance / self.num_draws).sqrt()


def gradient_variance(model, data, guide, loss: str | ELBO = "trace", num_draws: int = 100,
                      **loss_options) -> dict[str, GradientMoments]:
    r"""Draws ``num_draws`` independent gradient estimates of ``loss`` at the current parameters.

    Each draw is one call of the estimator's ``loss_and_grads`` (what one SVI step
    uses), parameters unchanged and estimators that adapt while training (the importance
    law over t of :class:`~freqvi.estimators.TimeSubsampledELBO`) held fixed through
    their ``frozen()`` context, so estimators can be compared on the same model
    and guide: by bias (against each other's ``mean``, or a
    known gradient), by variance and by signal-to-noise ratio. Gradients are of
    the ELBO (not of the loss) with respect to the unconstrained parameters, in
    float64.

    :param model: the model callable.
    :param data: one array or a tuple of arrays passed to model and guide.
    :param guide: the guide callable (its parameters are created on the first draw if new).
    :param loss: an :class:`~pyro.infer.ELBO` or a name from :data:`~freqvi.estimators.ESTIMATORS`.
    :param num_draws: independent draws, at least 2.
    :returns: parameter name -> :class:`GradientMoments`.
    """
    num_draws = check_positive_int(num_draws, "num_draws", minimum=2)
    data = as_data(data)
    elbo = get_estimator(loss, **loss_options)
    guide_names = _param_names(guide, data)
    draws: dict[str, list[torch.Tensor]] = {}
    with getattr(elbo, "frozen", nullcontext)():
        for _ in range(num_draws):
            for name, grad in _one_draw(elbo, model, guide, data).items():
                draws.setdefault(name, []).append(grad)
    return {name: _moments(torch.stack(g), "guide" if name in guide_names else "model")
            for name, g in draws.items()}


def _one_draw(elbo: ELBO, model, guide, data) -> dict[str, torch.Tensor]:
    with poutine.trace(param_only=True) as param_capture:
        elbo.loss_and_grads(model, guide, *data)
    grads = {}
    for name in param_capture.trace.nodes:
        unconstrained = pyro.param(name).unconstrained()
        grad = unconstrained.grad
        grads[name] = torch.zeros_like(unconstrained, dtype=torch.float64) if grad is None \
            else -grad.detach().double()
        unconstrained.grad = None
    return grads


def _param_names(fn, data) -> set[str]:
    with poutine.block(), poutine.trace(param_only=True) as capture:
        fn(*data)
    return set(capture.trace.nodes)


def _moments(draws: torch.Tensor, owner: str) -> GradientMoments:
    return GradientMoments(owner, draws.mean(0), draws.var(0), draws.shape[0])

"""How noisy an estimator's gradients are, on the user's own model and guide: a driver, which runs the
pair on the data as many times as it draws, under the drivers' thread policy and data plate."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO

from freqvi.estimators.registry import get_estimator
from freqvi.infer.pair import resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.traces import check_pair, data_plate, max_plate_nesting
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


@thread_policy
def gradient_variance(model, data, guide=None, loss: str | ELBO = "trace", num_draws: int = 100, *,
                      data_plate_name: str = "data", **loss_options) -> dict[str, GradientMoments]:
    r"""Draws ``num_draws`` independent gradient estimates of ``loss`` at the current parameters.

    Each draw is one call of the estimator's ``loss_and_grads`` (what one SVI step
    uses), parameters unchanged and estimators that adapt while training (the importance
    law over t of :class:`~freqvi.estimators.TimeSubsampledELBO`) held fixed through
    their ``frozen()`` context, so estimators can be compared on the same model
    and guide: by bias (against each other's ``mean``, or a
    known gradient), by variance and by signal-to-noise ratio. Gradients are of
    the ELBO (not of the loss) with respect to the unconstrained parameters, in
    float64.

    The model and guide are first run once on the data and checked to agree
    (:func:`~freqvi.traces.check_pair`); an estimator given by name is built with the
    pair's plate nesting and, where it sums over observations (IWAE, DReG, STL), the
    plate ``data_plate_name`` (:func:`~freqvi.estimators.get_estimator`).

    :param model: a freqvi model (which brings its own guide), a model callable with ``guide``,
        or a ``(model, guide)`` tuple.
    :param data: one array or a tuple of arrays passed to model and guide.
    :param guide: the guide callable (its parameters are created on the first run if new).
    :param loss: an :class:`~pyro.infer.ELBO` or a name from :data:`~freqvi.estimators.ESTIMATORS`.
    :param num_draws: independent draws, at least 2.
    :param data_plate_name: the model's plate over observations (checked to exist when not
        ``"data"``).
    :param loss_options: the estimator's constructor options, with a name only.
    :returns: parameter name -> :class:`GradientMoments`.
    :raises FreqviInputError: the arguments in another order than ``(model, data, guide)``, a
        ``num_draws`` below 2, a model and guide that do not agree, no plate
        ``data_plate_name`` in the model, or estimator options that do not fit (before any draw).
    """
    num_draws = check_positive_int(num_draws, "num_draws", minimum=2)
    data = as_data(data)
    pair = resolve_pair(model, guide)
    model_trace, guide_trace = check_pair(pair.model, pair.guide, data)
    if data_plate_name != "data":  # the default name may be absent: a pair without a data plate
        data_plate(model_trace, data_plate_name, data[0].shape[0])
    elbo = get_estimator(loss, plate_name=data_plate_name,
                         plate_nesting=max_plate_nesting(model_trace, guide_trace), **loss_options)
    guide_names = _param_names(pair.guide, data)
    draws: dict[str, list[torch.Tensor]] = {}
    with getattr(elbo, "frozen", nullcontext)():
        for _ in range(num_draws):
            for name, grad in _one_draw(elbo, pair.model, pair.guide, data).items():
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

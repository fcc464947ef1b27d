"""``maximize_likelihood``: the MLE by direct maximisation of an exact log-likelihood."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import pyro
import torch

from freqvi.errors import ConvergenceWarning, FreqviError, FreqviInputError
from freqvi.infer.log_likelihood import exact_route
from freqvi.infer.pair import resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.traces import check_model, data_plate, param_names, unconstrained_params
from freqvi.validation import as_data, check_positive_float, check_positive_int


@dataclass
class MLEResult:
    """What :func:`maximize_likelihood` returns.

    :ivar log_likelihood: :math:`\\ell(\\hat\\theta)`, the total over observations.
    :ivar num_iter: L-BFGS iterations taken.
    :ivar converged: whether the largest gradient entry fell to ``tol``.
    :ivar gradient: that largest entry of :math:`|\\nabla \\ell / n|` at the end.
    :ivar wall_time: seconds spent.
    """

    log_likelihood: float
    num_iter: int
    converged: bool
    gradient: float
    wall_time: float

    def __repr__(self) -> str:
        state = "converged" if self.converged else "not converged"
        return (f"MLEResult: log-likelihood {self.log_likelihood:.6g} nats after {self.num_iter} L-BFGS "
                f"iterations in {self.wall_time:.2f} s, {state} (largest |gradient| / n {self.gradient:.2g})")


@thread_policy
def maximize_likelihood(model, data, *, max_iter: int = 500, tol: float = 1e-7,
                        data_plate_name: str = "data") -> MLEResult:
    r"""Maximises the exact log-likelihood :math:`\ell(\theta) = \sum_i \log p(x_i; \theta)` by L-BFGS.

    The reference that EM and variational fits are judged against, for models whose
    log-likelihood :func:`~freqvi.log_likelihood` computes exactly: a freqvi model's
    ``log_marginal`` (the random-intercept GLMM's adaptive Gauss-Hermite quadrature,
    the mixture's log-sum-exp, factor analysis's Gaussian marginal), or enumeration of
    discrete latent sites in a user's model. L-BFGS with a strong-Wolfe line search
    runs over the model's unconstrained parameters from their current values (which
    stay at the optimum) on :math:`-\ell / n`, so ``tol`` is a gradient per observation.
    Float64 data are needed for tolerances much below 1e-5.

    :param model: a freqvi model or a model callable (no guide is needed).
    :param data: one array or a tuple of arrays, as for :func:`~freqvi.fit`.
    :param max_iter: most L-BFGS iterations; a :class:`~freqvi.errors.ConvergenceWarning`
        if they run out first.
    :param tol: stop when every entry of :math:`\nabla_\theta \ell / n` (unconstrained
        scale) is at most this in absolute value.
    :raises FreqviInputError: for a bad option, data or a model without an exact log-likelihood.
        Also when the log-likelihood or its gradient stops being finite (or a matrix
        factorisation fails) along the way, the likelihood unbounded on degenerate data; the
        parameters are then put back at their starting values (and dtype).
    """
    max_iter = check_positive_int(max_iter, "max_iter")
    tol = check_positive_float(tol, "tol")
    data = as_data(data)
    pair = resolve_pair(model, None, require_guide=False)
    model_trace = check_model(pair.model, data)
    n = data[0].shape[0]
    frame = data_plate(model_trace, data_plate_name, n)
    exact = exact_route(pair, model_trace)
    if exact is None:
        raise FreqviInputError(
            "maximize_likelihood needs an exact log-likelihood: a model with log_marginal() or whose "
            "latent sites are all discrete; fit this one with freqvi.fit or freqvi.em."
        )
    bounded = getattr(pair.owner, "check_bounded", None)  # a model that knows data it has no maximum on
    if bounded is not None:
        bounded(*data)
    params = unconstrained_params(param_names(model_trace))
    optimizer = torch.optim.LBFGS(params, max_iter=max_iter, max_eval=10 * max_iter, tolerance_grad=tol,
                                  tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    evaluations = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -exact(data, frame).sum() / n
        loss.backward()
        value = float(loss.detach())
        evaluations.append(value)
        if not (math.isfinite(value) and all(torch.isfinite(p.grad).all() for p in params)):
            raise _Diverged(f"at evaluation {len(evaluations)} the log-likelihood per observation is "
                            f"{-value:.6g}" + ", its gradient not finite" * math.isfinite(value))
        return loss

    start, initial = time.perf_counter(), [p.detach().clone() for p in params]
    try:
        with pyro.validation_enabled(False):
            optimizer.step(closure)
            loss = float(closure().detach())  # the loss and gradient at the final point
    except FreqviError:
        _restore(params, initial)
        raise
    except (_Diverged, RuntimeError, ValueError) as exc:  # a singular matrix is a RuntimeError
        _restore(params, initial)
        raise FreqviInputError(  # the data are unusable for this: the boundary restores dtypes too
            f"maximize_likelihood failed: {exc}. The log-likelihood has no maximum where L-BFGS went: "
            "degenerate data (a constant column, identical or collinear rows) let a variance fall to 0 "
            "and the likelihood grow without bound. The parameters are back at their starting values; "
            "remove the degenerate columns, or use em, whose M-step floors variances (a mixture's "
            "reg_covar)."
        ) from None
    gradient = max(float(p.grad.abs().max()) for p in params)
    for p in params:
        p.grad = None
    num_iter = optimizer.state[params[0]]["n_iter"]  # LBFGS keeps its state on the first parameter
    converged = gradient <= tol
    if not converged:
        warnings.warn(f"maximize_likelihood stopped after {num_iter} iterations with a gradient of "
                      f"{gradient:.2g} per observation (tol {tol:g}); raise max_iter, or fit in float64.",
                      ConvergenceWarning, stacklevel=2)
    return MLEResult(-loss * n, num_iter, converged, gradient, time.perf_counter() - start)


def _restore(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)
            p.grad = None


class _Diverged(ArithmeticError):
    """The objective or its gradient left the finite numbers: L-BFGS is stopped at once."""

"""One guarded optimisation step on an ELBO: a non-finite loss or gradient updates nothing."""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.optim import PyroOptim

from freqvi.errors import FreqviError
from freqvi.infer.compiled import CompiledLoss
from freqvi.traces import trace


class GuardedStep:
    """Takes SVI steps on ``elbo``, refusing any whose loss or gradients are not finite.

    A refused step leaves every parameter as it was; the next call draws afresh
    (for a Monte-Carlo estimator another draw may well be finite). After
    ``max_retries`` refusals in a row the run stops with a :class:`FreqviError`
    that names the step, the estimator and the offending site or parameter, with
    the last good parameters in place.

    :param params: the unconstrained parameters to update, by name.
    :param optimizer: a torch optimiser over them, or a :class:`~pyro.optim.PyroOptim`.
    :param clip_norm: if given, gradients are rescaled to this total norm at most.
    :param jit: compute the loss by a graph traced at the first step
        (:class:`~freqvi.infer.compiled.CompiledLoss`) instead of running the model
        and guide through Pyro at every step.
    """

    def __init__(self, model, guide, elbo: ELBO, params: dict[str, torch.Tensor], optimizer,
                 max_retries: int = 3, clip_norm: float | None = None, jit: bool = False):
        self.model, self.guide, self.elbo = model, guide, elbo
        self.params, self.optimizer = params, optimizer
        self.max_retries, self.clip_norm = max_retries, clip_norm
        self.compiled = CompiledLoss(model, guide, elbo, params) if jit else None
        self.refused = 0

    def __call__(self, step: int, *data) -> float | None:
        """The loss of an accepted step, or ``None`` if this step was refused."""
        loss = self._loss_and_grads(data)
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        bad = self._non_finite(loss, norm)
        if bad is None:
            if self.clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(list(self.params.values()), self.clip_norm, norm)
            self._update()
            self.refused = 0
            return loss
        self._zero_grad()
        self.refused += 1
        if self.refused > self.max_retries:
            first = step - self.refused + 1  # refused steps count as steps
            raise FreqviError(
                f"step {first}: the {type(self.elbo).__name__} {bad} in {self.refused} draws in a row "
                f"(steps {first} to {step}); "
                f"{self._culprit(data)}. The parameters are those of the last good step; lower lr, "
                "clip gradients (clip_norm=...) or check the model's densities there."
            )
        return None

    def _loss_and_grads(self, data) -> float:
        """The loss estimate, its gradients left in the parameters' ``.grad``."""
        if self.compiled is None:
            return self.elbo.loss_and_grads(self.model, self.guide, *data)
        loss = self.compiled(data)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())

    def _non_finite(self, loss: float, norm: torch.Tensor) -> str | None:
        """What was not finite, if anything; one norm over all gradients checks them at once."""
        if not math.isfinite(loss):
            return f"loss was {loss}"
        if not torch.isfinite(norm):
            names = [n for n, p in self.params.items()
                     if p.grad is not None and not torch.isfinite(p.grad).all()]
            return f"gradient of {names} was not finite"
        return None

    def _update(self) -> None:
        if isinstance(self.optimizer, PyroOptim):
            self.optimizer([p for p in self.params.values() if p.grad is not None])
        else:
            self.optimizer.step()
        self._zero_grad()

    def _zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def _culprit(self, data) -> str:
        """The first site whose log-density is not finite at the current parameters, if any."""
        try:
            with torch.no_grad():
                guide_trace = trace(self.guide, *data)
                model_trace = trace(poutine.replay(self.model, trace=guide_trace), *data)
        except (ValueError, RuntimeError) as exc:  # a distribution refused its parameters
            return f"running the model and guide fails: {exc}"
        for where, tr in (("guide", guide_trace), ("model", model_trace)):
            for name, site in tr.nodes.items():
                if site["type"] != "sample":
                    continue
                log_p = site["fn"].log_prob(site["value"])
                if not torch.isfinite(log_p).all():
                    return f"the {where}'s site {name!r} has a non-finite log-density"
        return "no site's log-density is non-finite on a fresh draw, so the draws themselves were extreme"

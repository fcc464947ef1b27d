"""One guarded optimisation step on an ELBO: a non-finite loss, gradient or update changes nothing."""

from __future__ import annotations

import math
from collections import defaultdict

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import transform_to
from pyro.infer import ELBO
from pyro.optim import PyroOptim

from freqvi.errors import FreqviError
from freqvi.infer.compiled import CompiledLoss
from freqvi.traces import trace

# A loss this many times its last accepted value's size (at least 1 nat) above it means the update
# between them diverged: Monte-Carlo noise in an ELBO is orders of magnitude smaller. lr=1e6 on a
# small VAE takes the loss from 342 to 1.1e28 in one step, finite all the way.
_BLOWUP = 1e6
# What a failing loss computation raises: a distribution refusing its parameters (ValueError), a
# Cholesky factorisation or a sampler meeting inf or NaN (RuntimeError and its LinAlgError).
_COMPUTATION_ERRORS = (ValueError, RuntimeError)


class GuardedStep:
    r"""Takes SVI steps on ``elbo``, refusing any that would leave the run worse than not moving.

    A step is refused, and changes no parameter and no optimiser state, when its loss
    cannot be computed (a distribution refuses its parameters, a factorisation fails)
    or is not finite, when a gradient is not finite, or when its update is: after it,
    some parameter (in the constrained space the model reads, so an unconstrained
    value of 1e6 under a ``positive`` constraint, :math:`e^{10^6} = \infty`, counts) or
    some optimiser state is not finite. The next call draws afresh (for a Monte-Carlo
    estimator another draw may well be finite). After ``max_retries`` refusals in a row
    the run stops with a :class:`~freqvi.errors.FreqviError` naming the step, the estimator and the
    cause, with the last good parameters in place: if the loss stays non-finite at the
    parameters the last accepted update produced but is finite at those before it,
    that update is what diverged, and it is undone too. An update after which the loss,
    though finite, rises above the last accepted loss :math:`L` by more than
    :math:`10^6 \max(|L|, 1)` diverged as well: it is undone and the run stops at once.
    :meth:`GuardedStep.require_progress` makes a run whose every step was refused an error.

    :param params: the unconstrained parameters to update, by their param-store names.
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
        self.taken = self.accepted = 0
        self.update_diverged = False
        self.failure: str | None = None
        self.last_refusal = ""
        self.constrained = _constrained_views(params)
        # the state before this step's update, and before the last accepted update (with its index)
        self.before, self.before_last = _Saved(), _Saved()
        self.last_accepted: int | None = None
        self.reference = math.nan  # the loss of the last accepted step, before its update

    def __call__(self, step: int, *data) -> float | None:
        """The loss of an accepted step, or ``None`` if this step was refused."""
        self.taken += 1
        self.update_diverged = False
        loss, bad = self._loss_and_check(data)
        if bad is None and self.accepted and loss - self.reference > _BLOWUP * max(abs(self.reference), 1.0):
            raise self._blowup(step, loss)
        if bad is None:
            if self.clip_norm is not None:
                grads = [p.grad for p in self.params.values() if p.grad is not None]
                torch.nn.utils.clip_grads_with_norm_(list(self.params.values()), self.clip_norm,
                                                     torch.nn.utils.get_total_norm(grads))
            self.before.take(self.params, self.optimizer)
            self._update()
            bad = self._diverged()
            self.update_diverged = bad is not None
            if bad is None:
                self.refused, self.accepted = 0, self.accepted + 1
                self.last_accepted, self.reference = step, loss
                self.before, self.before_last = self.before_last, self.before  # buffers reused
                return loss
            self.before.put_back(self.params, self.optimizer)
        self._zero_grad()
        self.refused += 1
        self.last_refusal = bad
        if self.refused > self.max_retries:
            raise self._failure(step, bad, data)
        return None

    def require_progress(self) -> None:
        """Raises :class:`~freqvi.errors.FreqviError` if steps were taken and every one was refused.

        Such a run changed nothing, so returning its result as a fit would be a silent failure.
        """
        if self.taken and not self.accepted:
            raise FreqviError(
                f"none of the {self.taken} steps was accepted (the last was refused as its "
                f"{self.last_refusal}), so nothing was fitted; the parameters are those the run started "
                "from. Lower lr, clip gradients (clip_norm=...) or check the model's densities there."
            )

    def _loss_and_check(self, data) -> tuple[float, str | None]:
        """The loss estimate, its gradients left in ``.grad``, and what made it unusable, if anything."""
        loss = self._loss_and_grads(data)
        if self.failure is not None:
            return loss, self.failure
        return loss, self._non_finite(loss)

    def _loss_and_grads(self, data) -> float:
        """The loss estimate, its gradients left in the parameters' ``.grad``.

        A loss that cannot be computed is NaN, the reason kept in ``self.failure``: an error
        raised here would keep this process from the collective step of a data-parallel group
        (:class:`~freqvi.infer.distributed.AveragedStep`), whose other processes would wait forever.
        """
        self.failure = None
        try:
            if self.compiled is None:
                return self.elbo.loss_and_grads(self.model, self.guide, *data)
            loss = self.compiled(data)
            if loss.requires_grad:
                loss.backward()
            return float(loss.detach())
        except FreqviError:  # a refusal of the pair itself (a graph that cannot be traced), not of a draw
            raise
        except _COMPUTATION_ERRORS as exc:
            self._zero_grad()
            self.failure = f"loss could not be computed ({_describe(exc)})"
            return math.nan

    def _non_finite(self, loss: float) -> str | None:
        """What was not finite, if anything: the loss, or gradients (checked before any update, so a
        refusal for either has nothing to undo)."""
        if not math.isfinite(loss):
            return f"loss was {loss}"
        if _all_finite([p.grad for p in self.params.values() if p.grad is not None]):
            return None
        names = [n for n, p, _ in self.constrained if p.grad is not None and not _all_finite([p.grad])]
        return f"gradient of {names} was not finite"

    def _diverged(self) -> str | None:
        """What the update left non-finite: parameters as the model reads them, or optimiser state."""
        with torch.no_grad():
            values = [(name, transform(p)) for name, p, transform in self.constrained]
            state = [t for t in _optimizer_tensors(self.optimizer) if t.is_floating_point()]
            if _all_finite([v for _, v in values] + state):
                return None
        names = [name for name, v in values if not _all_finite([v])]
        if names:
            return f"parameters {names} were not finite after its update"
        return "optimiser's state was not finite after its update"

    def _update(self) -> None:
        if isinstance(self.optimizer, PyroOptim):
            self.optimizer([p for p in self.params.values() if p.grad is not None])
        else:
            self.optimizer.step()
        self._zero_grad()

    def _zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def _failure(self, step: int, bad: str, data) -> FreqviError:
        """The error ending the run, after undoing the last accepted update if that is what diverged."""
        first = step - self.refused + 1  # refused steps count as steps
        steps = f"in {self.refused} draws in a row (steps {first} to {step})"
        advice = "lower lr, clip gradients (clip_norm=...) or check the model's densities there."
        if self.update_diverged:
            return FreqviError(f"step {first} diverged: the {bad} {steps}. The parameters are those "
                               "before it; " + advice)
        draws = f"the {type(self.elbo).__name__} {bad} {steps}"
        if self._finite_before_last_update(data):
            return FreqviError(
                f"step {self.last_accepted} diverged: after its update {draws}, while at the parameters "
                f"before it the loss is finite. The parameters are those before step {self.last_accepted}; "
                + advice)
        return FreqviError(f"step {first}: {draws}; {self._culprit(data)}. The parameters are those of "
                           "the last good step; " + advice)

    def _blowup(self, step: int, loss: float) -> FreqviError:
        """The error for a loss that the last accepted update sent up by orders of magnitude, that
        update undone."""
        self._zero_grad()
        self.before_last.put_back(self.params, self.optimizer)
        return FreqviError(
            f"step {self.last_accepted} diverged: after its update the {type(self.elbo).__name__} loss rose "
            f"from {self.reference:.4g} to {loss:.4g} (step {step}), more than {_BLOWUP:g} times its size. "
            f"The parameters are those before step {self.last_accepted}; lower lr or clip gradients "
            "(clip_norm=...)."
        )

    def _finite_before_last_update(self, data) -> bool:
        """Whether a fresh loss is finite at the state the last accepted update started from; if so
        that state is put back."""
        if self.last_accepted is None:
            return False
        after = _Saved()
        after.take(self.params, self.optimizer)
        self.before_last.put_back(self.params, self.optimizer)
        finite = math.isfinite(self._loss_and_grads(data))  # as a step computes it: one decision in a group
        self._zero_grad()
        if not finite:
            after.put_back(self.params, self.optimizer)
        return finite

    def _culprit(self, data) -> str:
        """The first site whose log-density is not finite at the current parameters, if any."""
        try:
            with torch.no_grad():
                guide_trace = trace(self.guide, *data)
                model_trace = trace(poutine.replay(self.model, trace=guide_trace), *data)
        except _COMPUTATION_ERRORS as exc:  # a distribution refused its parameters
            return f"running the model and guide fails: {_describe(exc)}"
        for where, tr in (("guide", guide_trace), ("model", model_trace)):
            for name, site in tr.nodes.items():
                if site["type"] != "sample":
                    continue
                log_p = site["fn"].log_prob(site["value"])
                if not torch.isfinite(log_p).all():
                    return f"the {where}'s site {name!r} has a non-finite log-density"
        return "no site's log-density is non-finite on a fresh draw, so the draws themselves were extreme"


class _Saved:
    """The parameters and optimiser state at one moment, to put back after an update is refused.

    Refreshed in place by one batched copy whenever the optimiser's state holds the same
    tensors as at the last refresh (every step after the first): a deep copy of its Python
    objects at every step cost a third of a small model's step.
    """

    def __init__(self):
        self.layout: list | None = None
        self.entries: list = []
        self.tensors: list[torch.Tensor] = []
        self.optimizers: set = set()

    def take(self, params: dict[str, torch.Tensor], optimizer) -> None:
        self.entries = [(o, p, key, value) for o in _torch_optimizers(optimizer)
                        for p, state in o.state.items() for key, value in state.items()]
        live = [*params.values(), *(v for *_, v in self.entries if isinstance(v, torch.Tensor))]
        layout = [(id(o), id(p), key, tuple(v.shape) if isinstance(v, torch.Tensor) else v)
                  for o, p, key, v in self.entries]
        if layout == self.layout and len(live) == len(self.tensors):
            torch._foreach_copy_(self.tensors, [t.detach() for t in live])
        else:
            self.layout, self.tensors = layout, [t.detach().clone() for t in live]
        self.optimizers = set(optimizer.optim_objs) if isinstance(optimizer, PyroOptim) else set()

    def put_back(self, params: dict[str, torch.Tensor], optimizer) -> None:
        with torch.no_grad():
            for p, value in zip(params.values(), self.tensors[:len(params)], strict=True):
                p.copy_(value)
        if isinstance(optimizer, PyroOptim):  # an optimiser created since goes, with its state
            for p in set(optimizer.optim_objs) - self.optimizers:
                del optimizer.optim_objs[p]
        saved = iter(self.tensors[len(params):])
        states = defaultdict(lambda: defaultdict(dict))
        for o, p, key, value in self.entries:
            states[o][p][key] = next(saved).clone() if isinstance(value, torch.Tensor) else value
        for o in _torch_optimizers(optimizer):
            o.state = states[o]


def _constrained_views(params: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, object]]:
    """Each unconstrained parameter with its param-store name and the transform to the value the model
    reads, matched by the tensor itself: a caller's dict may pair names and tensors in another order."""
    store = pyro.get_param_store().get_state()
    names = {id(t): n for n, t in store["params"].items()}
    views = []
    for key, p in params.items():
        name = names.get(id(p), key)
        views.append((name, p, transform_to(store["constraints"].get(name, constraints.real))))
    return views


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimisers a step changes: one, or a PyroOptim's one per parameter (unwrapping a
    learning-rate scheduler)."""
    if isinstance(optimizer, PyroOptim):
        return [getattr(o, "optimizer", o) for o in optimizer.optim_objs.values()]
    return [optimizer]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite.

    Screened by one fused reduction, the 2-norm of all of them (:func:`torch.nn.utils.get_total_norm`:
    a norm is finite only if every element is, and computing it allocates no copy, where concatenating
    the tensors to check them cost a tenth of a small network's step); only when the norm is not finite,
    which finite values overflowing it can also cause, is each tensor checked element by element.
    Detached, as torch's fused norm takes plain tensors only (a ``Parameter`` is checked one by one)."""
    if not tensors or bool(torch.isfinite(torch.nn.utils.get_total_norm([t.detach() for t in tensors]))):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _optimizer_tensors(optimizer):
    for o in _torch_optimizers(optimizer):
        for state in o.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _describe(exc: Exception) -> str:
    """An exception's type (``LinAlgError`` for torch's private ``_LinAlgError``) and first line: Pyro
    appends its trace-shape tables to a failing site's message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__.lstrip('_')}: {lines[0] if lines else ''}"

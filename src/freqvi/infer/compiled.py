"""An ELBO's differentiable loss traced once into a graph, so a step runs no Pyro machinery."""

from __future__ import annotations

import warnings

import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.poutine.runtime import _PYRO_STACK
from torch.jit import TracerWarning

from freqvi.errors import FreqviInputError
from freqvi.handlers import SubsamplePlate


class CompiledLoss:
    r"""``elbo``'s differentiable loss :math:`-\widehat{\mathcal L}(\theta, \phi)` on one
    model/guide pair, traced by :func:`torch.jit.trace` at the first call and replayed after.

    An eager step runs the model and the guide through Pyro's effect handlers, and on
    a small network most of its time beyond the arithmetic goes to that bookkeeping
    (messages through the handler stack, traces, distribution objects, ``pyro.param``
    lookups). The trace keeps only the tensor operations. Its inputs are the
    parameters, the data and the minibatch indices that an active
    :class:`~freqvi.handlers.SubsamplePlate` hands to its plate; each call replays the
    operations on their current values, fresh random draws included (the samplers are
    operations of the graph), and autograd differentiates the replay, so the loss and
    its gradient are those of the eager estimator.

    Everything else is fixed at the first call for given input shapes (a call with
    new shapes traces again): the sites, the plates, the scales ``n / b``, every
    branch the Python code takes. The model and guide must therefore have a fixed
    structure and read no tensor's value into Python (``if (x > 1).any():``,
    ``float(x.sum())``): that value would be frozen. Tracing catches ``.item()``
    (as in Pyro's ``Trace_ELBO``, whose per-particle value is a Python number) and
    raises :class:`~freqvi.errors.FreqviInputError`, as it does for an estimator whose
    gradient goes through tensor hooks, which a graph does not keep (``traceable =
    False``, e.g. :class:`~freqvi.estimators.DReG_ELBO`); other reads are not detected.

    :param params: the unconstrained parameters the model and guide read, by name.
    """

    def __init__(self, model, guide, elbo: ELBO, params: dict[str, torch.Tensor]):
        if not getattr(elbo, "traceable", True):
            raise FreqviInputError(
                f"jit=True cannot compile {type(elbo).__name__}: its gradient goes through tensor hooks, "
                "which a traced graph does not keep. Use jit=False."
            )
        self.model, self.guide, self.elbo, self.params = model, guide, elbo, params
        self.graphs: dict[tuple, torch.jit.ScriptFunction] = {}

    def __call__(self, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss, a 0-d tensor attached to the parameters."""
        inputs = (*self.params.values(), *data, *_plate_indices())
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._trace(data, inputs)
        # Unoptimised execution: the executor's optimised plan (after profiling runs) rounds
        # differently from its first runs, so a resumed run would drift from an uninterrupted one;
        # on the VAE benchmark it is also slower (2.41 against 2.22 ms a step).
        with torch.jit.optimized_execution(False):
            return self.graphs[key](*inputs)

    def _trace(self, data: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...]):
        def loss(*_inputs: torch.Tensor) -> torch.Tensor:
            # the inputs are the very tensors that the model, guide and plate read, so the tracer
            # records each use of them as a use of the graph's input
            return differentiable_loss(self.elbo, self.model, self.guide, data)

        # fork_rng: the tracing run's draws are discarded, so the step's draws are those of eager mode
        with torch.random.fork_rng(), warnings.catch_warnings():
            # .item() reads a value; the tracer's other warnings concern shapes, fixed per graph
            warnings.filterwarnings("ignore", category=TracerWarning)
            warnings.filterwarnings("error", "Converting a tensor to a Python number", TracerWarning)
            warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
            try:
                return torch.jit.trace(loss, inputs, check_trace=False)
            except (TracerWarning, SystemError) as exc:
                warning = _tracer_warning(exc)
                if warning is None:
                    raise
                raise FreqviInputError(
                    f"jit=True cannot compile this model/guide pair under {type(self.elbo).__name__}: "
                    f"{warning} A traced graph would freeze that value; use jit=False."
                ) from exc


def _tracer_warning(exc: BaseException) -> TracerWarning | None:
    """The tracer's warning behind ``exc``: raised in a tensor method, it comes wrapped in a SystemError."""
    if isinstance(exc, TracerWarning):
        return exc
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, TracerWarning) else None


def differentiable_loss(elbo: ELBO, model, guide, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    r"""The negative ELBO estimate as a tensor whose gradient is the estimator's.

    Pyro's ``Trace_ELBO.differentiable_loss`` (and its subclasses') returns
    ``loss + surrogate - surrogate.item()``, a Python number that a trace would
    freeze; here each particle's value and surrogate are combined as tensors,
    :math:`\frac1S \sum_s (\ell_s + \tilde\ell_s - \mathrm{stop}(\tilde\ell_s))`, as
    Pyro's own ``JitTrace_ELBO`` does. Other estimators' ``differentiable_loss`` is used as is.
    """
    if not isinstance(elbo, Trace_ELBO):
        return elbo.differentiable_loss(model, guide, *data)
    loss = 0.0
    for model_trace, guide_trace in elbo._get_traces(model, guide, data, {}):
        value, surrogate = elbo._differentiable_loss_particle(model_trace, guide_trace)
        loss = loss + (value + surrogate - surrogate.detach()) / elbo.num_particles
    return loss


def _plate_indices() -> tuple[torch.Tensor, ...]:
    """The index tensors that the active :class:`~freqvi.handlers.SubsamplePlate` handlers hand to plates."""
    return tuple(h.indices for h in _PYRO_STACK if isinstance(h, SubsamplePlate) and h.indices is not None)

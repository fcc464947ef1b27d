"""What every built-in model shares: lazy initialisation from data and statistical names."""

from __future__ import annotations

import itertools
from typing import Protocol, runtime_checkable

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam, pyro_method
from pyro.poutine.trace_struct import Trace
from torch.distributions import transform_to

from freqvi.errors import FreqviInputError

_instances = itertools.count()


class LatentVariableModel(PyroModule):
    """A model/guide pair whose parameters are created from the first data it sees.

    Subclasses define ``model(x)``, ``guide(x)`` (the exact posterior where one
    exists, returning its normaliser ``log p(x_i)`` per visited row, so that EM
    reads the log-likelihood off the E-step's trace), ``_initial_values(x)``
    (default starting values from data) and ``_estimate_names`` (the statistical
    names :meth:`estimates` reports).
    Each instance gets a unique Pyro name, so two models never share entries of
    Pyro's global parameter store.
    """

    data_plate = "data"
    #: Whether ``guide`` is the exact posterior at the current parameters and returns
    #: ``log p(x_i)``; a model with an intractable posterior sets it to ``False``.
    exact_guide: bool = True
    _estimate_names: tuple[str, ...] = ()

    def __init__(self, init: dict | None = None, name: str | None = None):
        super().__init__(name=name or f"{type(self).__name__}_{next(_instances)}")
        self._init = self._check_init(init) if init is not None else None
        self._constraints: dict[str, constraints.Constraint] = {}

    @property
    def initialized(self) -> bool:
        """Whether the parameters exist (they are created on the first call with data)."""
        return bool(self._constraints)

    def _ensure_initialized(self, x: torch.Tensor) -> None:
        if not self.initialized:
            values = self._init if self._init is not None else self._initial_values(x)
            self._set_values({k: torch.as_tensor(v, dtype=x.dtype) for k, v in values.items()})
        elif self._dtype() != x.dtype:
            self.to(x.dtype)

    def _dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype

    def _set(self, name: str, value: torch.Tensor, constraint: constraints.Constraint) -> None:
        """Sets a constrained parameter, in place once it exists (optimisers keep their state)."""
        if name in self._constraints:
            unconstrained = getattr(self, f"{name}_unconstrained")
            with torch.no_grad():
                unconstrained.copy_(transform_to(constraint).inv(value.detach()))
        else:
            setattr(self, name, PyroParam(value.detach().clone(), constraint))
            self._constraints[name] = constraint

    def _set_values(self, values: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError  # each model maps its statistical names to parameters

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _check_init(self, init: dict) -> dict:
        return init

    def estimates(self) -> dict[str, torch.Tensor]:
        """The fitted parameters under their statistical names, detached."""
        self._require_initialized()
        return {k: v.detach() for k, v in self.statistics().items()}

    @pyro_method
    def statistics(self) -> dict[str, torch.Tensor]:
        """The parameters under their statistical names, differentiable.

        They are read through ``pyro.param``, so handlers such as
        ``poutine.substitute`` apply (the delta method uses this).
        """
        return {k: getattr(self, k) for k in self._estimate_names}

    def _require_initialized(self) -> None:
        if not self.initialized:
            raise FreqviInputError(
                f"{type(self).__name__} has no parameters yet; they are created from data on the "
                "first call, e.g. by freqvi.em(model, x) or model.model(x)."
            )


@runtime_checkable
class ClosedFormMStep(Protocol):
    """A model whose M-step has a closed form in expected sufficient statistics.

    For an exponential-family complete-data likelihood, EM's M-step maps the
    averaged expected sufficient statistics :math:`\\bar s = \\frac1n \\sum_i
    \\mathbb E_q[T(x_i, z_i)]` to :math:`\\theta(\\bar s)`. Blending the statistics,
    :math:`s_t = (1-\\gamma_t) s_{t-1} + \\gamma_t \\hat s_t`, is the natural-gradient
    step of stochastic VI; :math:`\\gamma_t = 1` on the full data is batch EM and a
    decreasing :math:`\\gamma_t` on minibatches is online EM (Cappe and Moulines 2009).
    A model whose statistics are not plain averages (centred ones, kept for float32
    accuracy) also defines ``blend_statistics(old, new, gamma)``, which EM then uses.
    """

    def expected_statistics(self, guide_trace: Trace, *data: torch.Tensor) -> dict:
        """Averages over the observations of the guide trace's plate of E_q[T(x_i, z_i)]."""

    def maximize(self, statistics: dict) -> None:
        """Sets the parameters to the maximiser theta(s) of the expected complete-data likelihood."""


@runtime_checkable
class ClosedFormEStep(Protocol):
    """A model whose exact E-step has a closed form in the data, beside its closed-form M-step.

    ``posterior_statistics(*data)`` returns what :meth:`~freqvi.models.ClosedFormMStep.expected_statistics`
    returns for the trace of the model's exact ``guide`` on all of ``data`` (the same
    statistics, to rounding), and :math:`\\log p(x_i)` per observation, shape ``(n,)``, the
    normaliser that guide returns; computed from the current parameters as plain tensor
    algebra, without running a Pyro program. :func:`~freqvi.em` uses it for exact EM with the
    closed-form M-step on data in memory, once :func:`~freqvi.traces.check_model` has run the
    model on those data (its own guide matches it by construction, so it is not run): one Pyro
    trace per iteration (a fixed cost of a few hundred microseconds) is most of an iteration of
    a small mixture. A start at which some :math:`\\log p(x_i)` is not finite is refused.
    """

    def posterior_statistics(self, *data: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The exact posterior's expected statistics on every row of ``data``, and ``log p(x_i)``."""

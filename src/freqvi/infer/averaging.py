r"""Parameter averaging for :func:`~freqvi.fit`: an exponential moving average or a Polyak-Ruppert average.

A stochastic-gradient fit with a constant step size ends wherever its last noisy step left it:
the iterate :math:`\theta_t` fluctuates around the optimum with a spread of the order of the step
size. An average of the iterates removes most of that noise:

- :class:`~freqvi.EMA`, an exponential moving average, the device of every diffusion trainer (Ho et al.
  2020, decay 0.9999):
  :math:`\bar\theta_k = d_k \bar\theta_{k-1} + (1 - d_k) \theta_k`, with :math:`\bar\theta_0` the
  parameters at the start and, with ``warmup``, :math:`d_k = \min(d, k / (9 + k))` at the
  :math:`k`-th update, the warm-up of TensorFlow's ``tf.train.ExponentialMovingAverage``
  (``num_updates``), so that the first iterates are not swamped by the starting values.
- :class:`~freqvi.Polyak`, the Polyak-Ruppert average
  :math:`\bar\theta_t = \frac{1}{t - s + 1} \sum_{u=s}^{t} \theta_u` of the iterates from step
  :math:`s` on, which makes a stochastic-approximation estimate asymptotically efficient (Polyak
  and Juditsky 1992, "Acceleration of stochastic approximation by averaging", SIAM J. Control
  Optim. 30(4)); :math:`s > 1` skips the transient from the starting values.

Both are running linear interpolations ``average.lerp_(iterate, w_k)`` (:math:`w_k = 1 - d_k`, or
:math:`w_k = 1/k` for the :math:`k`-th iterate averaged) computed by torch's own
:func:`torch.optim.swa_utils.get_ema_multi_avg_fn` and
:func:`~torch.optim.swa_utils.get_swa_multi_avg_fn`, the update functions of
:class:`torch.optim.swa_utils.AveragedModel`. That class itself does not fit: it deep-copies an
``nn.Module``, while a Pyro pair's parameters live in the parameter store, partly outside modules.

The average is taken of the unconstrained tensors the optimiser updates, not of the constrained
values the model sees: those are the coordinates of the stochastic-approximation recursion whose
average Polyak and Juditsky analyse, and any average of unconstrained values maps back into the
constraint's support (an average of constrained values need not: the rows of a correlation
matrix's Cholesky factor have unit norm, and their average does not).

Only accepted steps are averaged: a step that ``fit`` refuses (its loss, gradients or update not
finite) updates nothing and is not an iterate of the recursion.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_multi_avg_fn

from freqvi.errors import FreqviInputError
from freqvi.infer.checkpoint import stable_name

_AVERAGE_NAMES = ("ema", "polyak")


@dataclass(frozen=True)
class EMA:
    r"""An exponential moving average of the parameters (see :mod:`freqvi.infer.averaging`).

    :param decay: :math:`d \in (0, 1)`; the average forgets an iterate's weight by a factor
        :math:`d` a step, so it spans about :math:`1/(1-d)` steps.
    :param warmup: use :math:`d_k = \min(d, k/(9 + k))` at the :math:`k`-th update (TensorFlow's
        ``ExponentialMovingAverage`` warm-up) instead of :math:`d` throughout. Then :math:`d_k < d`
        until :math:`k = 9d/(1-d)` (8,991 updates for 0.999): until then the average spans about the
        last tenth of the run, whatever ``d``.
    :param leave_raw: leave the last iterate (or, with ``validation_data``, the iterate of the
        best evaluation) in the model at the end instead of the average; evaluations still use the
        average.
    """

    decay: float = 0.999
    warmup: bool = True
    leave_raw: bool = False

    def __post_init__(self):
        if isinstance(self.decay, bool) or not isinstance(self.decay, int | float) or not 0 < self.decay < 1:
            raise FreqviInputError(f"EMA decay must be a number strictly between 0 and 1; got "
                                   f"{self.decay!r}.")
        _check_flag(self.warmup, "EMA warmup")
        _check_flag(self.leave_raw, "EMA leave_raw")

    def weight(self, updates: int) -> float:
        """The weight :math:`1 - d_k` of the iterate in the update that follows ``updates`` earlier ones."""
        decay = min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay
        return 1.0 - decay


@dataclass(frozen=True)
class Polyak:
    r"""The Polyak-Ruppert average of the iterates from step ``start`` on (see :mod:`freqvi.infer.averaging`).

    :param start: the first step (counted from 1) whose iterate enters the average; before it the
        average is the current iterate.
    :param leave_raw: as for :class:`EMA`.
    """

    start: int = 1
    leave_raw: bool = False

    def __post_init__(self):
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 1:
            raise FreqviInputError(f"Polyak start must be an integer step >= 1; got {self.start!r}.")
        _check_flag(self.leave_raw, "Polyak leave_raw")


def _check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise FreqviInputError(f"{name} must be True or False; got {value!r}.")


def as_average(average) -> EMA | Polyak | None:
    """``fit``'s ``average`` option as an :class:`EMA`, a :class:`Polyak` or ``None``.

    ``"ema"`` is ``EMA()`` (decay 0.999 with warm-up), ``"polyak"`` is ``Polyak()`` (every iterate).

    :raises FreqviInputError: for anything else.
    """
    if average is None or isinstance(average, EMA | Polyak):
        return average
    if average == "ema":
        return EMA()
    if average == "polyak":
        return Polyak()
    raise FreqviInputError(f"average must be None, one of {list(_AVERAGE_NAMES)}, an EMA(...) or a "
                           f"Polyak(...); got {average!r}.")


class Averager:
    """The average of a fit's unconstrained parameters, kept beside them.

    :param average: the :class:`EMA` or :class:`Polyak` to keep, or ``None`` (then every method is
        the identity: the raw parameters are the ones evaluated and left).
    :param params: the live unconstrained parameters by name, updated in place by the optimiser.
    """

    def __init__(self, average: EMA | Polyak | None, params: dict[str, torch.Tensor]):
        self.average, self.params = average, params
        # EMA starts at the initial parameters; a Polyak average is overwritten by its first iterate.
        self.values = [p.detach().clone() for p in params.values()] if average is not None else []
        self.count = 0  # iterates averaged so far

    def update(self, step: int) -> None:
        """Takes the iterate after ``step`` steps (counted from 1) into the average."""
        if self.average is None:
            return
        live = [p.detach() for p in self.params.values()]
        if isinstance(self.average, EMA):
            get_ema_multi_avg_fn(1.0 - self.average.weight(self.count))(self.values, live, None)
        elif step >= self.average.start:
            get_swa_multi_avg_fn()(self.values, live, self.count)  # weight 1/(count + 1)
        else:
            return
        self.count += 1

    @property
    def active(self) -> bool:
        """Whether the average is not the current iterate (an EMA always, a Polyak average once begun)."""
        return isinstance(self.average, EMA) or (self.average is not None and self.count > 0)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged values in the live parameters for the block (an evaluation), the raw ones after."""
        if not self.active:
            yield
            return
        raw = [p.detach().clone() for p in self.params.values()]
        self._copy(self.values)
        try:
            yield
        finally:
            self._copy(raw)

    def kept(self) -> list[torch.Tensor]:
        """The values the fit leaves in the model: the average's, or the raw ones with ``leave_raw``."""
        if not self.active or self.average.leave_raw:
            return [p.detach() for p in self.params.values()]
        return self.values

    def leave(self) -> None:
        """Copies :meth:`kept` into the live parameters (the end of a run without validation data)."""
        if self.active and not self.average.leave_raw:
            self._copy(self.values)

    def settings(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint; empty without averaging."""
        return {} if self.average is None else {"average": repr(self.average)}

    def state(self) -> dict:
        """The averaged values by stable name, and the count, for a checkpoint."""
        names = [stable_name(n) for n in self.params]
        return {"values": {n: v.cpu() for n, v in zip(names, self.values, strict=True)}, "count": self.count}

    def load(self, state, where: str) -> None:
        """Restores :meth:`state`, checked against the live parameters first.

        :raises FreqviInputError: if the checkpoint ``where`` lacks the average or holds one of other
            names, shapes or dtypes, non-finite values or a count that is not a non-negative integer.
        """
        expected = {stable_name(n): p for n, p in self.params.items()}
        values = state.get("values") if isinstance(state, dict) else None
        count = state.get("count") if isinstance(state, dict) else None
        fits = isinstance(values, dict) and set(values) == set(expected) and all(
            isinstance(values[n], torch.Tensor) and values[n].shape == p.shape and values[n].dtype == p.dtype
            and bool(torch.isfinite(values[n]).all()) for n, p in expected.items())
        if not fits or type(count) is not int or count < 0:
            raise FreqviInputError(
                f"{where} holds no usable parameter average; expected finite values for "
                f"{ {n: tuple(p.shape) for n, p in expected.items()} } and a non-negative count, as "
                f"{self.average!r} writes. It was edited, or written by another run or version.")
        with torch.no_grad():
            for value, name in zip(self.values, expected, strict=True):
                value.copy_(values[name])
        self.count = count

    def _copy(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for tensor, value in zip(self.params.values(), values, strict=True):
                tensor.copy_(value)

"""``fit``: stochastic variational inference for any model/guide pair."""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro.infer import ELBO
from pyro.optim import PyroOptim
from pyro.poutine.trace_struct import Trace
from tqdm.auto import tqdm

from freqvi.errors import FitInterruptedWarning, FreqviError, FreqviInputError
from freqvi.estimators import get_estimator
from freqvi.infer.averaging import EMA, Averager, Polyak, as_average
from freqvi.infer.batches import BatchSource, InMemoryBatches, make_batches
from freqvi.infer.checkpoint import check_checkpoint_path, checkpoint_lock, stable_name
from freqvi.infer.devices import move_to, on_device, resolve_device
from freqvi.infer.distributed import AveragedStep, DataParallel
from freqvi.infer.optim import make_optimizer
from freqvi.infer.pair import Pair, resolve_pair
from freqvi.infer.run_state import RunState, deferred_interrupts
from freqvi.infer.step import GuardedStep
from freqvi.infer.threads import thread_policy
from freqvi.infer.vectorize import check_particles
from freqvi.traces import check_pair, max_plate_nesting, param_names, unconstrained_params
from freqvi.validation import as_data, check_positive_float, check_positive_int, check_seed

_VALIDATION_SEED = 20_231_117
#: Accepted steps whose one-draw ELBO estimates the progress bar averages (:func:`progress_text`).
PROGRESS_WINDOW = 100


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :ivar elbo: the ELBO estimate at each step (full-data scale, also under minibatches).
    :ivar num_steps: steps taken.
    :ivar converged: whether the ``tol`` criterion stopped the run.
    :ivar wall_time: seconds spent in the loop.
    :ivar loss: the estimator used.
    :ivar validation_steps: the steps after which the held-out ELBO was evaluated.
    :ivar validation_elbo: the held-out ELBO at those steps (``validation_data`` only).
    :ivar best_step: the step whose parameters were kept: the held-out ELBO's argmax.
    :ivar stopped_early: whether ``patience`` ended the run.
    :ivar refused_steps: steps whose loss or gradients were not finite, so nothing was updated.
    :ivar cpu_time: CPU seconds this process spent in the loop (every thread's).
    :ivar stop_reason: why the run ended: ``"num_steps"``, ``"converged"`` (``tol``), ``"patience"``,
        ``"max_time"``, ``"max_cpu_time"``, ``"on_step"`` or ``"on_evaluation"`` (a callback asked),
        ``"interrupted"`` (Ctrl-C), or, in a data-parallel group, ``"stopped by another process"``.
    :ivar interrupted: whether Ctrl-C ended the run (``stop_reason == "interrupted"``).
    :ivar average: the parameter average kept (``fit``'s ``average``), or ``None``.
    """

    elbo: list[float] = field(default_factory=list)
    num_steps: int = 0
    converged: bool = False
    wall_time: float = 0.0
    loss: ELBO | None = None
    validation_steps: list[int] = field(default_factory=list)
    validation_elbo: list[float] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    refused_steps: int = 0
    cpu_time: float = 0.0
    stop_reason: str = ""
    interrupted: bool = False
    average: EMA | Polyak | None = None

    def __repr__(self) -> str:
        """A few lines: estimator, steps, time, the final ELBO and its per-step spread, why it stopped."""
        loss = type(self.loss).__name__ if self.loss is not None else "no estimator"
        lines = [f"FitResult: {self.num_steps} steps of {loss} in {self.wall_time:.2f} s "
                 f"({self.cpu_time:.2f} CPU s); stopped by {self.stop_reason or 'num_steps'}"]
        if self.elbo:
            # Per-step values are one-draw estimates: the mean of the last ones is what to read.
            tail = np.asarray(self.elbo[-100:], dtype=float)
            spread = f", s.d. {tail.std(ddof=1):.3g} per step" if len(tail) > 1 else ""
            lines.append(f"  ELBO {tail.mean():.6g} nats (mean of the last {len(tail)} steps{spread})")
        if self.validation_elbo:
            best = max(self.validation_elbo)
            lines.append(f"  held-out ELBO: best {best:.6g} nats at step {self.best_step}"
                         + (", stopped early" if self.stopped_early else ""))
        if self.average is not None:
            left = "the last iterate" if self.average.leave_raw else "the average"
            lines.append(f"  parameters averaged by {self.average!r}; {left} left in the model")
        if self.refused_steps:
            lines.append(f"  refused steps (loss, gradient or update not finite): {self.refused_steps}")
        return "\n".join(lines)


@thread_policy
def fit(
    model,
    data,
    guide=None,
    *,
    loss: str | ELBO = "trace",
    optim: str | PyroOptim | torch.optim.Optimizer = "adam",
    lr: float = 0.01,
    num_steps: int = 1000,
    tol: float | None = None,
    window: int = 50,
    batch_size: int | None = None,
    data_plate_name: str = "data",
    seed: int | None = None,
    progress: bool = True,
    validation_data=None,
    eval_every: int = 100,
    patience: int | None = None,
    max_retries: int = 3,
    clip_norm: float | None = None,
    jit: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    checkpoint_seconds: float | None = None,
    resume: str | os.PathLike | None = None,
    num_observations: int | None = None,
    device: str | torch.device | None = None,
    distributed: bool = False,
    max_time: float | None = None,
    max_cpu_time: float | None = None,
    on_step: Callable[[FitResult], bool | None] | Sequence[Callable] | None = None,
    on_evaluation: Callable[[FitResult], bool | None] | Sequence[Callable] | None = None,
    average: str | EMA | Polyak | None = None,
    **loss_options,
) -> FitResult:
    r"""Maximises an ELBO over the model's and the guide's parameters by SVI.

    Each step draws a fresh estimate of :math:`-\mathrm{ELBO}(q, \theta)` from
    ``loss`` and takes one optimiser step on every parameter the model and guide
    touch. With ``batch_size`` each step visits ``batch_size`` observations of
    the plate ``data_plate_name`` (epochs of a random permutation); Pyro scales
    the plate's sites by ``n / batch_size``, so the estimate stays unbiased for
    the full data's ELBO.

    :param model: a model callable, a freqvi model (then ``guide=None`` uses its
        exact-posterior guide) or a ``(model, guide)`` tuple.
    :param data: one array or a tuple of arrays, passed to model and guide as
        positional arguments; float64 data fits in float64, integer and boolean arrays pass
        unchanged, NaN cells only marked by :func:`freqvi.with_missing`. Or data larger than
        memory: an iterable of batches (a :class:`torch.utils.data.DataLoader`,
        :class:`freqvi.datasets.NpyBatches`, a generator; each batch an array or a
        tuple of arrays), the model called with each batch in turn and its data plate
        scaled by ``num_observations / len(batch)``.
    :param guide: the guide callable, or ``None`` as above.
    :param loss: an :class:`~pyro.infer.ELBO` or a name from
        :data:`freqvi.estimators.ESTIMATORS`; ``loss_options`` go to its constructor, with
        ``data_plate_name`` and the pair's plate nesting where it takes them. An estimator that
        draws its particles at once needs a pair that broadcasts over them
        (:mod:`freqvi.infer.vectorize`), checked before the first step.
    :param optim: a name from :data:`freqvi.infer.optim.OPTIMIZERS` (one torch
        optimiser over all parameters, learning rate ``lr``), a torch optimiser
        already built over them, or a :class:`~pyro.optim.PyroOptim`.
    :param num_steps: maximum number of steps.
    :param tol: stop when the mean ELBO of the last ``window`` steps changes by
        less than ``tol`` times its magnitude from the window before.
    :param seed: seeds Python's, NumPy's and torch's generators first.
    :param progress: show a tqdm progress bar, with the mean of the last 100 steps' ELBO estimates
        and its standard error (:func:`~freqvi.infer.fit.progress_text`).
    :param validation_data: held-out observations (an array or tuple like ``data``).
        Every ``eval_every`` steps and after the last, the estimator's ELBO on them
        is evaluated (no gradient, always the same random numbers, so that successive
        values differ by the parameters only, and the training draws are those of a
        run without ``validation_data``); at the end the parameters of the model
        and guide are set back to those of the best evaluation.
    :param eval_every: steps between held-out evaluations.
    :param patience: with ``validation_data``, stop after this many evaluations
        without a new best held-out ELBO (early stopping); ``None``: never.
    :param max_retries: a step whose loss, gradients or update are not finite updates
        nothing and the next draws are tried; after this many refusals in a row the
        run stops with an error naming the step, estimator and offending site, the
        last good parameters in place (:class:`~freqvi.infer.step.GuardedStep`: an update
        that sends the loss up a millionfold is undone at once, and a run with no accepted
        step is an error).
    :param clip_norm: if given, each step's gradients are rescaled to at most this
        total norm.
    :param jit: trace the loss into a graph at the first step and replay it after
        (:class:`~freqvi.infer.compiled.CompiledLoss`): the same estimator without Pyro's
        per-step bookkeeping, for model/guide pairs of fixed structure whose Python code
        reads no tensor's value (a pair that does is refused with an error).
    :param checkpoint: a file to write the run's state to every ``checkpoint_every``
        steps (and after the step that ends ``checkpoint_seconds`` since the last write,
        if given), at the end and on interruption (Ctrl-C or SIGTERM, see below):
        parameters, optimiser state, step, history, every random generator's state
        and the minibatch order. Writes are atomic. The path is checked before any work
        (a regular file or nothing, in a writable folder) and locked while the run lasts:
        a second run writing it, or a failed write, is a :class:`~freqvi.errors.CheckpointError`.
    :param resume: a checkpoint to continue from: build the model and guide as for
        the first run and call ``fit`` with the same arguments; the run then ends
        with the parameters an uninterrupted run would have (bit for bit on CPU). A
        streamed source must be able to save its position (``state_dict()``); a plain
        ``DataLoader`` cannot, and is refused.
    :param num_observations: the number of observations the data plate stands for: of the
        whole data set behind streamed batches (default ``source.num_observations`` or
        ``len(source.dataset)``), or behind this process's shard.
    :param device: ``"cpu"``, ``"cuda"`` or a :class:`torch.device`: the model's and guide's
        modules and parameters are moved there, each batch is sent there, and tensors the
        model creates land there.
    :param distributed: data-parallel SVI under ``torchrun`` (:mod:`freqvi.infer.distributed`):
        ``data`` is this process's shard, gradients are averaged across processes every
        step, process 0 writes checkpoints and progress.
    :param max_time: a budget in wall-clock seconds of the loop (after the checks): the step
        that reaches it is the last (``stop_reason="max_time"``).
    :param max_cpu_time: the same in CPU seconds of this process, every thread counted.
    :param on_step: a callable, or a list of them, called after every step with the
        :class:`FitResult` so far (``elbo``, ``num_steps``, ``wall_time``, ``cpu_time`` up to
        date); one returning true ends the run after that step (``stop_reason="on_step"``).
    :param on_evaluation: the same, called after every held-out evaluation
        (``validation_elbo[-1]`` the newest); true ends the run (``"on_evaluation"``).
    :param average: keep an average of the iterates beside the raw parameters
        (:mod:`freqvi.infer.averaging`): ``"ema"`` (:class:`~freqvi.EMA`, decay 0.999
        with warm-up), ``"polyak"`` (:class:`~freqvi.Polyak`, every iterate), or either
        object with its options. The average, of the unconstrained parameters and over accepted
        steps, is what held-out evaluations (and so early stopping and the parameters kept) use,
        what checkpoints save beside the raw parameters and ``resume`` restores, and what the run
        leaves in the model at the end (the raw last iterate with ``leave_raw=True``). The
        optimiser always steps from the raw parameters.
    :returns: the :class:`FitResult`, also after Ctrl-C: the current step finishes, the
        checkpoint (if any) is written, and the result comes back with ``interrupted=True``
        and a :class:`~freqvi.errors.FitInterruptedWarning`; a second Ctrl-C stops at once.
        SIGTERM (a scheduler ending the job) instead raises ``KeyboardInterrupt`` after the
        checkpoint, so that the process ends.
    :raises FreqviInputError: a bad option (``max_time``, ``max_cpu_time``, a callback that is
        not callable, an unknown ``average``, ...), before any step.
    """
    num_steps = check_positive_int(num_steps, "num_steps")
    seed = check_seed(seed)
    window = check_positive_int(window, "window")
    tol = None if tol is None else check_positive_float(tol, "tol", allow_zero=True)
    max_retries = check_positive_int(max_retries, "max_retries", minimum=0)
    if clip_norm is not None:
        clip_norm = check_positive_float(clip_norm, "clip_norm")
    eval_every = check_positive_int(eval_every, "eval_every")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    check_checkpoint_path(checkpoint)
    if checkpoint_seconds is not None:
        checkpoint_seconds = check_positive_float(checkpoint_seconds, "checkpoint_seconds")
    if patience is not None:
        patience = check_positive_int(patience, "patience")
    max_time = None if max_time is None else check_positive_float(max_time, "max_time")
    max_cpu_time = None if max_cpu_time is None else check_positive_float(max_cpu_time, "max_cpu_time")
    on_step, on_evaluation = _callbacks(on_step, "on_step"), _callbacks(on_evaluation, "on_evaluation")
    average = as_average(average)
    device = resolve_device(device)
    group = DataParallel(device) if distributed else None
    if group is not None and validation_data is not None:
        raise FreqviInputError("validation_data cannot be combined with distributed=True yet.")
    batches = make_batches(data, batch_size, data_plate_name, num_observations, device)
    if group is not None and num_observations is None and isinstance(batches, InMemoryBatches):
        batches.n = group.total(batches.rows)  # the shards together
    held_out = None
    if validation_data is not None:
        held_out = tuple(t.to(device) for t in as_data(validation_data, "validation_data"))
    pair = resolve_pair(model, guide)
    move_to(device, pair.model, pair.guide)
    if seed is not None:
        pyro.set_rng_seed(seed)
    with on_device(device):
        model_trace, guide_trace = _check_pair(pair, batches)
    batches.check_plate(model_trace, pair.guide)
    nesting = max_plate_nesting(model_trace, guide_trace)
    elbo = get_estimator(loss, plate_name=data_plate_name, plate_nesting=nesting, **loss_options)
    if getattr(elbo, "vectorize_particles", False):
        batch = batches.check_batch()
        with on_device(device):
            check_particles(batch.bind(pair.model), batch.bind(pair.guide), batch.data, elbo.num_particles,
                            nesting, type(elbo).__name__)
    # Sorted by the names without instance numbers, so a rebuilt model resumes in the same order.
    names = sorted(param_names(model_trace) | param_names(guide_trace), key=stable_name)
    params = dict(zip(names, unconstrained_params(names), strict=True))
    optimizer = make_optimizer(optim, lr, list(params.values()))
    step_options = (pair.model, pair.guide, elbo, params, optimizer, max_retries, clip_norm, jit)
    take_step = GuardedStep(*step_options) if group is None else AveragedStep(group, *step_options)
    if group is not None:
        group.broadcast(list(params.values()))  # every process starts from process 0's values
        if seed is not None:
            pyro.set_rng_seed(seed + group.rank)  # independent draws in each process
    averager = Averager(average, params)
    keeper = None
    if held_out is not None:
        rows = batch_size and min(batch_size, held_out[0].shape[0])
        checked = InMemoryBatches(held_out, rows, data_plate_name)
        with torch.random.fork_rng():  # adding validation data leaves the training draws as they were
            _check_pair(pair, checked)
        keeper = _BestParameters(names)

    result = FitResult(loss=elbo, average=average)
    settings = {**_settings(elbo, batch_size, batches.n), **averager.settings()}
    run = RunState(params, optimizer, batches, result, settings, group, averager)
    if checkpoint is not None or resume is not None:
        run.check_checkpointable(checkpoint, validation_data)
    first = run.restore(resume) if resume is not None else 0
    clock = _Clock(max_time, max_cpu_time)
    bar = tqdm(range(first, num_steps), initial=first, total=num_steps,
               disable=not progress or (group is not None and not group.writer), desc="fit", unit="step")
    # check_pair validated the distributions' arguments; Pyro re-checks them at every step by
    # default, a large share of a small model's step. GuardedStep refuses non-finite steps instead.
    with pyro.validation_enabled(False), deferred_interrupts() as signalled, on_device(device), \
            checkpoint_lock(checkpoint, group is None or group.writer):
        # read once a step; in a group, a request to stop seen by any process stops all after the same step
        agreed = (lambda flag: flag) if group is None else group.any
        written = time.monotonic()
        for step in bar:
            batch = batches.next()
            with batch.handler:
                value = take_step(step, *batch.data)
            if value is not None:
                averager.update(step + 1)
            _record(result, bar, step, value, clock)
            if tol is not None and _window_converged(result.elbo, window, tol):
                result.converged = True
            wanted = _stop_wanted(on_step, result, clock, signalled())
            if agreed(wanted is not None):
                terminated = agreed(signalled() == signal.SIGTERM)
                result.stop_reason = "terminated" if terminated else wanted or "stopped by another process"
            elif result.converged or step + 1 == num_steps:
                result.stop_reason = "converged" if result.converged else "num_steps"
            if keeper is not None and ((step + 1) % eval_every == 0 or result.stop_reason):
                _validate(result, keeper, averager, pair, elbo, held_out, step + 1)
                if not result.stop_reason and _patience_spent(result, patience):
                    result.stop_reason, result.stopped_early = "patience", True
                if not result.stop_reason and agreed(_asks_to_stop(on_evaluation, result)):
                    result.stop_reason = "on_evaluation"
            due = checkpoint_seconds is not None and time.monotonic() - written > checkpoint_seconds
            timely = checkpoint_seconds is not None and agreed(due)
            save = (step + 1) % checkpoint_every == 0 or result.stop_reason or timely
            if checkpoint is not None and save:
                run.save(checkpoint, step + 1)
                written = time.monotonic()
            if result.stop_reason == "terminated":
                raise KeyboardInterrupt(f"fit terminated after step {step + 1}"
                                        + (f"; checkpoint in {str(checkpoint)!r}" if checkpoint else ""))
            if result.stop_reason:
                break
    bar.close()
    take_step.require_progress()
    if keeper is not None:
        keeper.restore()
    else:
        averager.leave()
    result.wall_time, result.cpu_time = clock.elapsed()
    if result.stop_reason == "interrupted":
        result.interrupted = True
        warnings.warn(FitInterruptedWarning(
            f"fit interrupted after step {result.num_steps} of {num_steps}: the result holds the steps "
            "taken" + (f" and the checkpoint {str(checkpoint)!r} resumes the run" if checkpoint else "")
            + "."), stacklevel=3)
    return result


def _check_pair(pair: Pair, batches: BatchSource) -> tuple[Trace, Trace]:
    """:func:`~freqvi.traces.check_pair` on the observations of one step, after the owner's ``check_data``
    (where the model has one) on every row.

    One step's rows, not all: a trace of every row keeps every intermediate value (for a diffusion
    model, ``T`` denoiser outputs per row: gigabytes and seconds before the first step).
    """
    batch = batches.check_batch()
    check_data = getattr(pair.owner, "check_data", None)
    if check_data is not None:
        check_data(*batch.data)
    return check_pair(batch.bind(pair.model), batch.bind(pair.guide), batch.data)


def _record(result: FitResult, bar, step: int, value: float | None, clock: _Clock) -> None:
    """Books one step: its ELBO if accepted (a refused step updated nothing), the count and the time."""
    result.num_steps = step + 1
    result.wall_time, result.cpu_time = clock.elapsed()
    if value is None:
        result.refused_steps += 1
        return
    result.elbo.append(-value)
    if step % 10 == 0 and not bar.disable:
        bar.set_postfix_str(progress_text(result.elbo), refresh=False)


def progress_text(elbo: Sequence[float], window: int = PROGRESS_WINDOW) -> str:
    r"""The progress bar's summary of a run's ELBO estimates: the mean of the last ``window`` and its
    standard error, :math:`\bar v \pm s / \sqrt m` over those :math:`m` values.

    One step's estimate is a single noisy draw (a diffusion model's, of one random time step per
    observation, jumps by thousands of nats): their running mean is what follows the parameters.
    E.g. ``ELBO -2184.3 ± 3.7 (mean ± s.e. of the last 100 steps)``.
    """
    last = elbo[-window:]
    mean = math.fsum(last) / len(last)
    if len(last) < 2:
        return f"ELBO {mean:.5g} (one step)"
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in last) / (len(last) - 1))
    return f"ELBO {mean:.5g} ± {sd / math.sqrt(len(last)):.2g} (mean ± s.e. of the last {len(last)} steps)"


class _Clock:
    """Wall and CPU seconds since the loop began, against the budgets ``max_time`` and ``max_cpu_time``."""

    def __init__(self, max_time: float | None, max_cpu_time: float | None):
        self.max_time, self.max_cpu_time = max_time, max_cpu_time
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu

    def spent(self, result: FitResult) -> str | None:
        """``"max_time"`` or ``"max_cpu_time"`` if that budget was used up at the end of the step just
        booked (the times the callbacks saw), else ``None``."""
        if self.max_time is not None and result.wall_time >= self.max_time:
            return "max_time"
        if self.max_cpu_time is not None and result.cpu_time >= self.max_cpu_time:
            return "max_cpu_time"
        return None


def _stop_wanted(on_step: list[Callable], result: FitResult, clock: _Clock, signum: int) -> str | None:
    """Why the run should end after this step, if a signal, a budget or a callback says so."""
    if signum:
        return "interrupted"
    if _asks_to_stop(on_step, result):
        return "on_step"
    return clock.spent(result)


def _asks_to_stop(callbacks: list[Callable], result: FitResult) -> bool:
    """Calls every callback with the result so far (all of them, each sees every step); true if one
    returned true."""
    answers = [callback(result) for callback in callbacks]
    return any(bool(a) for a in answers)


def _callbacks(value, name: str) -> list[Callable]:
    """``value`` (``None``, a callable or a sequence of callables) as a list, checked."""
    if value is None:
        return []
    callbacks = [value] if callable(value) else value
    if not isinstance(callbacks, list | tuple) or not all(callable(c) for c in callbacks):
        raise FreqviInputError(f"{name} must be a callable or a list of callables; got {value!r}.")
    return list(callbacks)


def _settings(elbo: ELBO, batch_size: int | None, n: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint (num_steps may grow)."""
    return {"estimator": type(elbo).__name__, "num_particles": getattr(elbo, "num_particles", 1),
            "batch_size": batch_size, "num_observations": n}


def _patience_spent(result: FitResult, patience: int | None) -> bool:
    """Whether the last ``patience`` held-out evaluations all failed to beat the best one."""
    since_best = len(result.validation_steps) - 1 - result.validation_steps.index(result.best_step)
    return patience is not None and since_best >= patience


class _BestParameters:
    """A copy of the unconstrained parameters at their best held-out ELBO, to restore in place.

    In place, so optimisers and modules keep referring to the same tensors. ``names`` in fit's order
    (that of its ``params`` and of the averaged values saved here).
    """

    def __init__(self, names: list[str]):
        self.tensors = unconstrained_params(names)
        self.best: list[torch.Tensor] = []

    def save(self, values: list[torch.Tensor]) -> None:
        """Keeps a copy of ``values``, one per tensor (the averaged or the raw parameters)."""
        self.best = [v.detach().clone() for v in values]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, best in zip(self.tensors, self.best, strict=True):
                tensor.copy_(best)


def _validate(result: FitResult, keeper: _BestParameters, averager: Averager, pair, elbo: ELBO, held_out,
              step: int) -> None:
    """Appends the held-out ELBO after ``step`` steps, of the averaged parameters if averaging; keeps the
    parameters to leave (:meth:`~freqvi.infer.averaging.Averager.kept`) if it is the best yet."""
    with torch.no_grad(), torch.random.fork_rng(), averager.applied():
        torch.manual_seed(_VALIDATION_SEED)  # common random numbers across evaluations
        value = -elbo.loss(pair.model, pair.guide, *held_out)
    if not math.isfinite(value):
        raise FreqviError(f"step {step}: the held-out ELBO is {value}.")
    if result.best_step is None or value > max(result.validation_elbo):
        result.best_step = step
        keeper.save(averager.kept())
    result.validation_steps.append(step)
    result.validation_elbo.append(value)


def _window_converged(history: list[float], window: int, tol: float) -> bool:
    if len(history) < 2 * window:
        return False
    last = sum(history[-window:]) / window
    before = sum(history[-2 * window:-window]) / window
    return abs(last - before) <= tol * abs(last)

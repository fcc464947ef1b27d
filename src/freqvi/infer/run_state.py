"""What a checkpoint of a :func:`~freqvi.fit` run holds, and interruptions that wait for a step to end."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

import torch

from freqvi.errors import FreqviInputError
from freqvi.infer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, stable_name


class RunState:
    """The state of a fit that a checkpoint saves and a resumed run restores.

    :param params: unconstrained parameters by name, updated in place.
    :param optimizer: the torch optimiser over them.
    :param batches: the minibatch schedule (``state()``/``load()``).
    :param result: the :class:`~freqvi.FitResult` being filled.
    :param settings: what the resumed run must share with the first (estimator, batch size, ...).
    :param group: the :class:`~freqvi.infer.distributed.DataParallel` group of a data-parallel run:
        every process's generators and position in its data are saved, by process 0 only.
    :param averager: the run's :class:`~freqvi.infer.averaging.Averager`; a run that averages saves the
        average beside the raw parameters and restores both.
    :param keeper: a run with ``validation_data``: what keeps the best held-out parameters
        (``state(result)``/``load(state, result, step, where)``); its evaluations so far and best
        parameters are saved and restored with the rest.
    :param loss: the run's estimator; one with state of its own (``state_dict()``/``load_state_dict()``,
        e.g. the importance law of :class:`~freqvi.estimators.TimeSubsampledELBO`) has it saved and
        restored too.
    """

    def __init__(self, params: dict[str, torch.Tensor], optimizer, batches, result, settings: dict,
                 group=None, averager=None, keeper=None, loss=None):
        self.params, self.optimizer, self.batches, self.result = params, optimizer, batches, result
        self.settings, self.group, self.averager, self.keeper = settings, group, averager, keeper
        self.loss = loss if hasattr(loss, "state_dict") and hasattr(loss, "load_state_dict") else None

    def check_checkpointable(self, checkpoint) -> None:
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise FreqviInputError("checkpoints need a torch optimiser: pass optim by name or as a "
                                   "torch.optim.Optimizer, not a pyro.optim wrapper.")
        reason = self.batches.resumable()
        if reason is not None:
            raise FreqviInputError(f"checkpoint/resume: {reason}.")
        if checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
            raise FreqviInputError(f"checkpoint: the folder of {str(checkpoint)!r} does not exist.")

    def save(self, path, step: int) -> None:
        """Writes the state after ``step`` steps to ``path``, atomically (process 0 of a group)."""
        local = {"rng": rng_state(), "batches": self.batches.state()}
        ranks = [local] if self.group is None else self.group.gather(local)
        if self.group is not None and not self.group.writer:
            return
        state = {
            "step": step,
            "params": {stable_name(n): p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "ranks": ranks,
            "history": {"elbo": list(self.result.elbo), "refused_steps": self.result.refused_steps,
                        "num_steps": self.result.num_steps},
        }
        if self.averager is not None and self.averager.average is not None:
            state["average"] = self.averager.state()
        if self.keeper is not None:
            state["validation"] = self.keeper.state(self.result)
        if self.loss is not None:
            state["estimator"] = self.loss.state_dict()
        shapes = {stable_name(n): list(p.shape) for n, p in self.params.items()}
        save_checkpoint(path, state, {"kind": "fit", "settings": self.settings, "shapes": shapes})

    def restore(self, path) -> int:
        """Loads a checkpoint into the run; returns the step to continue from."""
        state, metadata = load_checkpoint(path, "fit", self.params, {"optimizer": self.optimizer})
        self._check(metadata, path)
        if self.averager is not None and self.averager.average is not None:  # checked before any copy
            self.averager.load(state.get("average"), f"checkpoint {str(path)!r}")
        if self.keeper is not None:  # checked before any copy; the step is a checked counter
            self.keeper.load(state.get("validation"), self.result, state["step"], f"checkpoint {str(path)!r}")
        if self.loss is not None:  # checked before any copy
            try:
                self.loss.load_state_dict(state.get("estimator"))
            except FreqviInputError as exc:
                raise FreqviInputError(f"checkpoint {str(path)!r}: {exc} It was edited, or written by "
                                       "another run or version.") from None
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][stable_name(name)])
        self.optimizer.load_state_dict(state["optimizer"])
        mine = self._own(state["ranks"], path)
        self.batches.load(mine["batches"])
        history = state["history"]
        self.result.elbo[:] = history["elbo"]
        self.result.refused_steps, self.result.num_steps = history["refused_steps"], history["num_steps"]
        set_rng_state(mine["rng"])
        return state["step"]

    def _own(self, ranks: list[dict], path) -> dict:
        """This process's generators and data position among those of every process saved."""
        size, rank = (1, 0) if self.group is None else (self.group.size, self.group.rank)
        if len(ranks) != size:
            raise FreqviInputError(f"checkpoint {str(path)!r} was written by a run of {len(ranks)} "
                                   f"process(es); this one has {size}: resume with as many.")
        return ranks[rank]

    def _check(self, metadata: dict, path) -> None:
        if metadata["settings"] != self.settings:
            raise FreqviInputError(
                f"checkpoint {str(path)!r} was written with {metadata['settings']}; this run has "
                f"{self.settings}: resume with the same estimator and batch_size."
            )
        shapes = {stable_name(n): list(p.shape) for n, p in self.params.items()}
        if metadata["shapes"] != shapes:
            raise FreqviInputError(
                f"checkpoint {str(path)!r} holds parameters {metadata['shapes']}; the model and guide "
                f"given have {shapes}: build them as for the run that wrote it."
            )


@contextmanager
def deferred_interrupts():
    """Turns Ctrl-C and SIGTERM into a flag, read between steps (main thread only).

    Yields a function returning the first pending signal's number (true), or 0 when none
    is pending; outside the main thread, where handlers cannot be installed, it is always 0.
    Once a signal is pending, the previous handlers are back: a second Ctrl-C acts at once.
    """
    pending = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    signals = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        pending.append(signum)
        for sig, old in previous.items():
            signal.signal(sig, old)

    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield lambda: pending[0] if pending else 0
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

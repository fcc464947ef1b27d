"""Checkpoints: atomic writes, loads that never execute code, and every random state.

A checkpoint is one file written by :func:`torch.save` holding only tensors,
numbers, strings and containers of them (so :func:`torch.load` reads it with
``weights_only=True``): the run's state, serialised, and a JSON string of
metadata with the state's SHA-256 digest, so a changed byte is caught. It is written to a
temporary file in the same folder, flushed to disk and renamed over the old
one, so a crash at any moment leaves the previous checkpoint intact.

A run that writes checkpoints checks its path before its first step
(:func:`check_checkpoint_path`: a regular file or nothing, in a folder where a file can be
created) and holds :func:`checkpoint_lock` while it runs, so that a second run writing the
same path is refused instead of interleaving its writes with the first's.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from freqvi.errors import CheckpointError, FreqviInputError

try:
    import fcntl
except ImportError:  # Windows has no flock: there a second writer is not detected
    fcntl = None

FORMAT = "freqvi-checkpoint-1"


def save_checkpoint(path: str | os.PathLike, state: dict, metadata: dict) -> None:
    """Writes ``state`` (tensors and plain values) and ``metadata`` (JSON) to ``path`` atomically.

    The bytes go to a hidden temporary file ``.<name>.XXXXXXXX.tmp`` beside the file ``path``
    names (through a symbolic link, beside its target), are flushed to disk, and the file is
    renamed over ``path``; anything at ``path`` that is not a regular file is never replaced.

    :raises FreqviInputError: if ``path`` names something other than a regular file.
    :raises CheckpointError: if the write fails (a full disk, a lost permission); the previous
        checkpoint is then intact and the temporary file removed.
    """
    target = _target(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blob = buffer.getvalue()
    digest = hashlib.sha256(blob).hexdigest()
    payload = {"state": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
               "metadata": json.dumps({"format": FORMAT, "sha256": digest, **metadata})}
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory: a full disk is then an OSError, not torch's archive error
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            _write_all(file, buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        _remove(temporary)
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be written ({type(exc).__name__}: {exc}); the previous "
            "checkpoint there, if any, is intact."
        ) from exc
    except BaseException:
        _remove(temporary)
        raise


def _write_all(file, data: memoryview) -> None:
    """Writes every byte of ``data`` to the open binary ``file``."""
    file.write(data)


def _remove(temporary: str | None) -> None:
    """Removes a temporary file if it exists; a failure to do so is left for the next run's cleanup."""
    if temporary is not None:
        try:
            os.unlink(temporary)
        except OSError:
            pass


def check_checkpoint_path(path: str | os.PathLike | None) -> None:
    """Checks, before a run's first step, that it can write its checkpoints to ``path``.

    ``path`` must name a regular file or nothing (a symbolic link is followed), in an
    existing folder where a file can be created: the temporary file a write uses is
    created there and removed. ``None`` (no checkpoints) passes.

    :raises FreqviInputError: for an empty path, a directory, a device, a FIFO or a socket
        at ``path``, a missing folder, or a folder where no file can be created.
    """
    if path is None:
        return
    target = _target(path)
    folder = target.parent
    if not folder.is_dir():
        raise FreqviInputError(f"checkpoint: the folder of {str(path)!r} ({str(folder)!r}) does not exist "
                               "or is not a folder.")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise FreqviInputError(
            f"checkpoint {str(path)!r}: no file can be created in the folder {str(folder)!r} "
            f"({type(exc).__name__}: {exc.strerror or exc}); choose a writable folder."
        ) from None
    os.close(handle)
    Path(probe).unlink(missing_ok=True)  # a run holding this checkpoint's lock may have removed it


def _target(path: str | os.PathLike) -> Path:
    """The file a checkpoint path names, symbolic links resolved; refused unless a regular file or nothing."""
    if not isinstance(path, str | os.PathLike):
        raise FreqviInputError(f"checkpoint must be a path (str or os.PathLike); got {type(path).__name__}.")
    if os.fspath(path) in ("", b""):
        raise FreqviInputError("checkpoint must name a file; got an empty path.")
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there; the folder is checked apart
        return target
    except OSError as exc:
        raise FreqviInputError(f"checkpoint {str(path)!r} cannot be examined ({exc.strerror}).") from None
    if not stat.S_ISREG(mode):
        raise FreqviInputError(
            f"checkpoint {str(path)!r} is {_kind(mode)}, not a regular file; a checkpoint replaces only a "
            "regular file: give the path of a file (existing or not)."
        )
    return target


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "a special file")


@contextmanager
def checkpoint_lock(path: str | os.PathLike | None, writer: bool = True) -> Iterator[None]:
    """Holds the lock of checkpoint ``path`` while a run writes it, and removes stale temporaries.

    The lock is :func:`fcntl.flock` on a hidden file ``.<name>.lock`` beside the
    checkpoint, removed when the run ends; a lock held by a process that died is
    released by the system. Holding it, no other run writes this checkpoint, so every
    temporary file of its writes left in the folder (``.<name>.XXXXXXXX.tmp``: a
    process killed during a write leaves one) is stale, and is removed. ``None``,
    or ``writer=False`` (a process of a data-parallel group that does not write), takes
    nothing; where there is no flock (Windows) the temporaries are removed without a lock.

    :raises CheckpointError: if another run (in this process or another) holds the lock.
    """
    if path is None or not writer:
        yield
        return
    target = _target(path)
    lock = target.parent / f".{target.name}.lock"
    handle = _acquire(lock, path) if fcntl is not None else None
    try:
        _remove_stale_temporaries(target)
        yield
    finally:
        if handle is not None:
            lock.unlink(missing_ok=True)  # before the release, so a waiting run locks a fresh file
            os.close(handle)


def _acquire(lock: Path, path) -> int:
    """An open descriptor of ``lock`` holding its exclusive flock.

    A run that ends removes the lock file before releasing it: a lock taken on a file
    that no longer has that name is retried on the new one.
    """
    while True:
        try:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: its lock file {str(lock)!r} cannot be created "
                                  f"({exc.strerror}).") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise CheckpointError(
                f"checkpoint {str(path)!r} is being written by another run (it holds {str(lock)!r}); "
                "two runs writing one checkpoint would interleave their states: give this run another "
                "path, or wait for the other to end."
            ) from None
        except OSError as exc:  # a file system without locks
            os.close(handle)
            raise CheckpointError(f"checkpoint {str(path)!r}: its lock file {str(lock)!r} cannot be locked "
                                  f"({exc.strerror}).") from None
        try:
            if os.fstat(handle).st_ino == os.stat(lock).st_ino:
                return handle
        except FileNotFoundError:
            pass
        os.close(handle)


def _remove_stale_temporaries(target: Path) -> None:
    """Removes ``.<name>.XXXXXXXX.tmp`` files of this checkpoint (only these: another checkpoint's are
    named after it)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    for entry in os.scandir(target.parent):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            _remove(entry.path)


def load_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    params: dict[str, torch.Tensor] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None) -> tuple[dict, dict]:
    """``(state, metadata)`` from a checkpoint, checked against the run about to resume from it.

    Without ``kind`` only the file is checked (readable, holding tensors and plain values
    only, its state matching its SHA-256 digest). With ``kind`` (``"fit"`` or ``"em"``, the
    driver resuming) the contents are checked before anything is restored, since a digest
    recomputed after an edit passes: the checkpoint was written by that driver; it holds
    exactly the parameters ``params`` (by name, instance numbers aside), each with their
    shape and dtype and finite (``copy_`` would broadcast a smaller tensor silently); each
    optimiser state in ``optimizers`` (by its key in the state) has one entry per
    parameter, its tensors scalars or of the parameter's shape; its counters (steps,
    iterations) are non-negative integers consistent with its history, the history finite;
    its random generators' states are ones the generators accept.

    :raises FreqviInputError: for a missing, truncated, foreign or tampered file, or contents
        that do not fit the run, saying what the checkpoint holds and what the run expected.
    """
    if not isinstance(path, str | os.PathLike):
        raise FreqviInputError(f"a checkpoint to resume from must be a path (str or os.PathLike); got "
                               f"{type(path).__name__}.")
    path = Path(path)
    if not path.is_file():
        raise FreqviInputError(f"checkpoint {str(path)!r} does not exist or is not a regular file.")
    try:
        payload = torch.load(path, weights_only=True)
        metadata = json.loads(payload["metadata"])
        if not isinstance(metadata, dict):
            raise TypeError(f"its metadata is a {type(metadata).__name__}, not a JSON object")
        blob = payload["state"].numpy().tobytes()
        if hashlib.sha256(blob).hexdigest() != metadata.get("sha256"):
            raise ValueError("the state does not match its SHA-256 digest")
        state = torch.load(io.BytesIO(blob), weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message is a page long; its first line suffices
        raise FreqviInputError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain values, which could "
            f"run code when loaded, so it was refused ({_first_line(exc)}): it is tampered with or "
            "not a freqvi checkpoint."
        ) from None
    except Exception as exc:  # torch's unpickler, fed foreign bytes, raises any type (an IndexError)
        raise FreqviInputError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc}): it is truncated, "
            "tampered with or not a freqvi checkpoint."
        ) from None
    if metadata.get("format") != FORMAT:
        raise FreqviInputError(f"{str(path)!r} is not a {FORMAT} file (format {metadata.get('format')!r}).")
    if kind is not None:
        _Contents(f"checkpoint {str(path)!r}", kind, state, metadata).check(params or {}, optimizers or {})
    return state, metadata


# What the generators raise for a state they refuse (torch's CUDA calls assert CUDA is there).
_REFUSED_STATES = (AssertionError, AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError)
# For each driver: the metadata keys its restore reads, its counters, its history of objectives.
_LAYOUTS = MappingProxyType({
    "fit": (("settings", "shapes"), ("step", "history.num_steps", "history.refused_steps"), "history.elbo"),
    "em": (("m_step", "params"), ("t", "history.num_iter"), "history.log_likelihood"),
})


class _Contents:
    """Checks of a checkpoint's state against the run resuming from it (see :func:`load_checkpoint`)."""

    def __init__(self, where: str, kind: str, state, metadata: dict):
        self.where, self.kind, self.state, self.metadata = where, kind, state, metadata

    def check(self, params: dict[str, torch.Tensor], optimizers: dict) -> None:
        found = self.metadata.get("kind")
        if found != self.kind:
            written = f"written by freqvi.{found}" if found in _LAYOUTS else f"of run kind {found!r}"
            raise FreqviInputError(f"{self.where} was {written}; this freqvi.{self.kind} run can resume only "
                                   f"from a checkpoint of freqvi.{self.kind}.")
        metadata_keys, counter_keys, history_key = _LAYOUTS[self.kind]
        missing = [key for key in metadata_keys if key not in self.metadata]
        if missing or not isinstance(self.state, dict):
            raise self._error(f"lacks {missing or 'a state dictionary'}", "a complete checkpoint")
        self._check_params({stable_name(n): p for n, p in params.items()})
        for key, optimizer in optimizers.items():
            self._check_optimizer(key, optimizer)
        counters = {key: self._get(key) for key in counter_keys}
        for key, value in counters.items():
            if type(value) is not int or value < 0:
                raise self._error(f"holds {key} = {value!r}", "a non-negative integer")
        history = self._get(history_key)
        if not isinstance(history, list) or not all(type(v) is float and math.isfinite(v) for v in history):
            raise self._error(f"holds a {history_key} that is not a list of finite numbers",
                              "the objective after each step")
        self._check_counts(counters, len(history))
        if self.kind == "fit":  # one state per process of a group
            ranks = self._get("ranks")
            for rank in ranks if isinstance(ranks, list) else [None]:
                self._check_rng(rank.get("rng") if isinstance(rank, dict) else rank)
                self._check_order(rank.get("batches") if isinstance(rank, dict) else rank)
        else:
            self._check_rng(self._get("rng"))
            self._check_order(self._get("batches"))

    def _check_order(self, batches) -> None:
        """The minibatch order of data in memory: a permutation of its rows and a position in it."""
        if not isinstance(batches, dict) or "order" not in batches:
            return  # a streamed source's own state, which its load_state_dict checks
        order, position = batches["order"], batches.get("position")
        rows = len(order) if isinstance(order, torch.Tensor) and order.dim() == 1 else -1
        permutation = rows >= 0 and not order.is_floating_point() and torch.equal(
            order.sort().values, torch.arange(rows, dtype=order.dtype))
        if not permutation or type(position) is not int or not 0 <= position <= max(rows, 1):
            raise self._error(f"holds a minibatch order {_describe(order)} at position {position!r}",
                              "a permutation of the rows and a position within it")

    def _check_counts(self, counters: dict, recorded: int) -> None:
        """An em run records one objective more than its iterations (the first at the initial
        parameters); a fit run no more objectives, accepted or refused steps than steps."""
        if self.kind == "em":
            iterations = counters["history.num_iter"]
            if recorded != iterations + 1:
                raise self._error(f"records {recorded} objectives after {iterations} iterations",
                                  "one objective more than iterations")
            return
        step = counters["step"]
        for what, count in (("objectives", recorded), ("as num_steps", counters["history.num_steps"]),
                            ("refused steps", counters["history.refused_steps"])):
            if count > step:
                raise self._error(f"records {count} {what} at step {step}", "no more than the steps taken")

    def _check_params(self, expected: dict[str, torch.Tensor]) -> None:
        saved = self._get("params")
        if not isinstance(saved, dict) or set(saved) != set(expected):
            names = sorted(saved) if isinstance(saved, dict) else saved
            raise self._error(f"holds parameters {names}", f"this run's parameters {sorted(expected)}: build "
                              "the model and guide as for the run that wrote it")
        wrong = [n for n, p in expected.items() if _describe(saved[n]) != _describe(p)]
        if wrong:
            held = {n: _describe(saved[n]) for n in wrong}
            needed = {n: _describe(expected[n]) for n in wrong}
            raise self._error(f"holds {held}", f"{needed} as this run's model and guide have: build them as "
                              "for the run that wrote it")
        infinite = [n for n, value in saved.items() if not torch.isfinite(value).all()]
        if infinite:
            raise self._error(f"holds non-finite values in {infinite}", "the finite parameters of a run")

    def _check_optimizer(self, key: str, optimizer: torch.optim.Optimizer) -> None:
        """The saved state of ``optimizer``: its groups' sizes, and each tensor finite and a scalar or of
        its parameter's shape (torch's ``load_state_dict`` checks the groups only)."""
        saved = self._get(key)
        sizes = [len(group["params"]) for group in optimizer.param_groups]
        try:
            saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
            order = [i for group in saved["param_groups"] for i in group["params"]]
            entries = [(order.index(i), dict(value)) for i, value in saved["state"].items()]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise self._error(f"holds a {key!r} that is not an optimiser's state", "a state_dict()") from None
        if saved_sizes != sizes:
            raise self._error(f"holds a {key!r} over parameter groups of sizes {saved_sizes}",
                              f"sizes {sizes}")
        live = [p for group in optimizer.param_groups for p in group["params"]]
        for index, value in entries:
            for tensor in (v for v in value.values() if isinstance(v, torch.Tensor)):
                if (tensor.dim() and tensor.shape != live[index].shape) or not torch.isfinite(tensor).all():
                    raise self._error(f"holds a {key!r} state {_describe(tensor)} for a parameter of "
                                      f"{_describe(live[index])}", "finite scalars or tensors of its shape")

    def _check_rng(self, rng) -> None:
        """Tries the generators' states on the generators, then puts the current ones back."""
        current = rng_state()
        try:
            set_rng_state(rng)
        except _REFUSED_STATES as exc:
            raise self._error(f"holds random generator states the generators refuse ({type(exc).__name__}: "
                              f"{exc})", "the states rng_state() records") from None
        finally:
            set_rng_state(current)

    def _get(self, dotted: str):
        value = self.state
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                raise self._error(f"lacks {dotted}", "a complete checkpoint")
            value = value[key]
        return value

    def _error(self, found: str, expected: str) -> FreqviInputError:
        return FreqviInputError(f"{self.where} {found}; expected {expected}. It was edited, or written by "
                                "another run or version.")


def _describe(value) -> str:
    """``"shape (2, 3) float32"`` for a tensor, its type's name for anything else."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _first_line(exc: Exception) -> str:
    """The line of torch's unpickler report that names what it refused, without its advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0].split(" Please use")[0]


def rng_state() -> dict:
    """The states of torch's, NumPy's and Python's generators, as checkpoint-safe values.

    NumPy's is the legacy global generator, the one :func:`pyro.set_rng_seed` seeds; CUDA's
    are included once CUDA is in use.
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
                                                      int(position), int(has_gauss), float(gauss)],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2], "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))  # noqa: NPY002
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def stable_name(name: str) -> str:
    """A parameter's name without its instance number: ``"VAE_3.decoder.w"`` -> ``"VAE.decoder.w"``.

    freqvi numbers every model and guide instance, so a model rebuilt to resume a
    run gets new numbers; parameters are matched by what remains.
    """
    return re.sub(r"^([^.]*?)_\d+(?=\.|$)", r"\1", name)

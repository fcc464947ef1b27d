"""How many threads torch's intra-op operations get while freqvi works, and giving the caller's back.

Torch splits an operation across its intra-op threads (by default one per physical
core). On the small tensors of most latent variable models that buys little on an
idle machine and costs a great deal on a busy one: threads that wait at the end of
each parallel region spin, and beside other processes they wait for a core. Measured
on a 2-core machine shared with other jobs, one EM iteration of a Gaussian mixture on
20,000 rows took 3.0 ms on one thread and 23 ms on two; on the same machine at a quiet
moment, two threads made it 1.66 times faster.

The policy, for each driver call (:func:`thread_policy`) and each block of work
(:func:`intra_op_threads`), first rule that applies:

1. ``num_threads=`` given to the driver (or to an enclosing driver or block);
2. the environment variable :data:`ENV_VAR` (``FREQVI_NUM_THREADS``);
3. one thread when a step reads fewer than :data:`SMALL_WORK` data entries;
4. otherwise the caller's setting, capped at the cores that other processes do not keep busy at
   the call (Linux: the runnable tasks in ``/proc/loadavg``; elsewhere no cap): on an idle
   machine large work gets every thread, beside busy processes one.

The caller's setting is restored on the way out, also when the work raises.
"""

from __future__ import annotations

import functools
import glob
import inspect
import math
import operator
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from freqvi.errors import FreqviInputError
from freqvi.validation import kept_on_refusal

ENV_VAR = "FREQVI_NUM_THREADS"

# Data entries one step reads (rows per step x entries per row), below which one thread runs it.
# Measured on the 2-core development machine (torch 2.13, OpenMP, MKL) at a quiet moment (load
# average 1), one EM iteration of a 5-component full-covariance mixture in 4 dimensions, median of
# 5: two threads ran 1.28x faster than one at 16,000 entries for 1.6x the CPU time, 1.50x at
# 32,000, 1.39x-1.71x from 48,000 to 256,000 (1.2x-1.25x the CPU time). Below 32,768 entries
# ATen's elementwise kernels do not split across threads anyway (its grain size), and the VAE
# (128 x 64 digits) and GLMM steps there ran no faster on two threads. Beside busy processes a
# second thread costs up to 8x (rule 4 drops it there: 20,000 rows, 3.0 ms against 23 ms).
SMALL_WORK = 32_768

# An explicit count from an enclosing driver or block, inherited by the drivers it calls.
_explicit: ContextVar[int | None] = ContextVar("freqvi_num_threads", default=None)


def check_num_threads(value) -> int:
    """``value`` as a positive int.

    :raises FreqviInputError: it is not a positive integer, saying what it was.
    """
    try:
        count = operator.index(value)
    except TypeError:
        count = 0
    if isinstance(value, bool) or count < 1:
        raise FreqviInputError(f"num_threads must be a positive integer; got {value!r}.")
    return count


def requested_num_threads(num_threads: int | None = None) -> int | None:
    """The count rules 1 and 2 set (argument, enclosing call, then :data:`ENV_VAR`), or ``None``."""
    if num_threads is not None:
        return check_num_threads(num_threads)
    if _explicit.get() is not None:
        return _explicit.get()
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise FreqviInputError(f"the environment variable {ENV_VAR} must be a positive integer; "
                               f"got {text!r}.")
    return int(text)


def _by_size(entries: int | None) -> int:
    """Rules 3 and 4: one thread below :data:`SMALL_WORK` entries a step, else the caller's count
    capped at the cores other processes leave free."""
    caller = torch.get_num_threads()
    if (entries is not None and entries < SMALL_WORK) or caller == 1:
        return 1  # one thread needs no look at the load (the look takes about 1.5 ms)
    return max(1, min(caller, _usable_cores() - _busy_cores()))


def _usable_cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _busy_cores(reads: int = 3, pause: float = 5e-4) -> int:
    """Runnable tasks of other processes, the least of ``reads`` looks: ``/proc/loadavg``'s fourth
    field counts every task runnable now, less this process's runnable threads (its own OpenMP or
    BLAS threads spin for a while after parallel work). A process that keeps a core busy is
    runnable at every look, a short-lived one is not. 0 where Linux's ``/proc`` is missing."""
    counts = []
    for i in range(reads):
        try:
            with open("/proc/loadavg", encoding="ascii") as loadavg:
                runnable = int(loadavg.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return 0
        counts.append(runnable - _own_runnable_threads())
        if i + 1 < reads:
            time.sleep(pause)
    return max(0, min(counts))


def _own_runnable_threads() -> int:
    """This process's threads in state R (running or waiting for a core), this one included."""
    count = 0
    for stat in glob.glob("/proc/self/task/*/stat"):
        try:
            with open(stat, encoding="ascii", errors="replace") as status:
                count += status.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue  # a thread that ended between the listing and the read
    return max(count, 1)


@contextmanager
def intra_op_threads(num_threads: int | None = None, *, entries: int | None = None) -> Iterator[int]:
    """Runs the block on the policy's thread count for steps reading ``entries`` data entries
    (``None``: unknown, so the caller's count unless one is requested); yields the count and
    restores the caller's afterwards, also when the block raises.

    An explicit ``num_threads`` also holds for the drivers called inside the block. Torch's
    setting is the process's: a block in one Python thread sets it for every thread.

    :raises FreqviInputError: ``num_threads`` or :data:`ENV_VAR` is not a positive integer.
    """
    requested = requested_num_threads(num_threads)
    count = requested if requested is not None else _by_size(entries)
    previous = torch.get_num_threads()
    token = _explicit.set(requested)
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield count
    finally:
        _explicit.reset(token)
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


NUM_THREADS_DOC = f"""
:param num_threads: torch's intra-op thread count during the call (keyword only). Default: the
    environment variable ``{ENV_VAR}`` if set, else one thread when a step reads fewer than
    {SMALL_WORK:,} data entries (rows per step times entries per row), else the caller's setting
    capped at the cores other processes leave free (:mod:`freqvi.infer.threads`). The caller's
    count is restored afterwards, also after an error; drivers called inside inherit an explicit
    count.
:raises FreqviInputError: ``num_threads`` or ``{ENV_VAR}`` is not a positive integer.
"""


def thread_policy(driver: Callable) -> Callable:
    """Decorates a driver taking ``data`` (and optionally ``batch_size``) with a ``num_threads=`` keyword.

    The driver runs inside :func:`intra_op_threads`, sized by :func:`step_entries`.
    """
    signature = inspect.signature(driver)

    @functools.wraps(driver)
    def wrapper(*args, num_threads: int | None = None, **kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError as exc:  # a misspelt or unknown option, refused in freqvi's terms
            raise FreqviInputError(f"{driver.__name__}: {exc}; its arguments are "
                                   f"{list(signature.parameters)}.") from None
        entries = step_entries(bound.get("data"), bound.get("batch_size"))
        caller = sys._getframe(1)
        with kept_on_refusal(bound.get("model")), intra_op_threads(num_threads, entries=entries), \
                _shown_at(caller.f_code.co_filename, caller.f_lineno):
            return driver(*args, **kwargs)

    parameters = [*signature.parameters.values()]
    keyword = inspect.Parameter("num_threads", inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation="int | None")
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD),
              len(parameters))
    wrapper.__signature__ = signature.replace(parameters=[*parameters[:at], keyword, *parameters[at:]])
    wrapper.__doc__ = inspect.cleandoc(driver.__doc__ or "") + "\n" + NUM_THREADS_DOC
    return wrapper


@contextmanager
def _shown_at(filename: str, lineno: int) -> Iterator[None]:
    """Shows warnings that point into this file (a driver's ``stacklevel=2`` now lands in the
    wrapper) at the driver's caller instead, where they pointed before the wrapper existed."""
    original = warnings.showwarning

    def show(message, category, warned_file, warned_line, file=None, line=None):
        if warned_file == __file__:
            warned_file, warned_line, line = filename, lineno, None
        original(message, category, warned_file, warned_line, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def step_entries(data, batch_size=None) -> int | None:
    """Data entries one step reads: rows per step times the entries of one row, summed over arrays.

    ``data``: an array or a tuple of arrays whose first dimension indexes observations;
    ``None`` for anything else (a stream of batches, whose size is not known before it is read).
    """
    arrays = data if isinstance(data, tuple | list) else (data,)
    shapes = [tuple(getattr(a, "shape", ())) for a in arrays]
    if not arrays or any(len(s) == 0 for s in shapes):
        return None
    rows = shapes[0][0]
    per_row = sum(math.prod(s[1:]) for s in shapes)
    if isinstance(batch_size, int) and 0 < batch_size < rows:
        rows = batch_size
    return rows * per_row

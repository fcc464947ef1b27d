"""Checks of the ``freqvi`` command's arguments, all made before any work.

Each option's value is checked by its argparse ``type=`` callable, so a bad value is a usage
error (argparse's usage line, ``argument --steps: expected ...``, exit status 2) before anything
is read or fitted. The places the command will write to (``--out``, ``--json``,
``--checkpoint``) are checked next, by :func:`check_outputs`, by creating a temporary file or
folder there and removing it; nothing is left behind when a check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from freqvi.errors import FreqviInputError
from freqvi.infer.checkpoint import check_checkpoint_path
from freqvi.validation import check_seed


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum`` (steps, batch sizes, particles, samples, widths)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its own messages
    return parse


def seed(text: str) -> int:
    """An argparse type: a seed in ``[0, 2**32 - 1]`` (:func:`~freqvi.validation.check_seed`'s range)."""
    try:
        return check_seed(int(text))
    except (ValueError, FreqviInputError):  # a FreqviInputError is a ValueError too
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1]; got {text!r}") from None


def real(minimum: float = 0.0, inclusive: bool = False, below: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite number above ``minimum`` (or at it, ``inclusive``) and below ``below``."""
    low = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    wanted = f"a finite number {low}" + ("" if below == math.inf else f" and < {below:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}; got {text!r}") from None
        above = value >= minimum if inclusive else value > minimum
        if not (math.isfinite(value) and above and value < below):
            raise argparse.ArgumentTypeError(f"expected {wanted}; got {text!r}")
        return value

    parse.__name__ = wanted
    return parse


def path(text: str) -> Path:
    """An argparse type: a file or folder path, not empty (``Path("")`` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path; got {text!r}")
    return Path(text)


def widths(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated layer widths, each an integer >= 1 (``"128,64"``)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != len(parts) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1; got {text!r}")
    return values


def check_outputs(args: argparse.Namespace) -> None:
    """Checks every place ``args`` will write to before any work: ``--out`` (a folder, created later),
    ``--json`` (a file), ``--checkpoint`` (a file, and with ``--resume`` one that exists); neither file
    may be the ``--data`` file.

    :raises FreqviInputError: naming the option and the path that cannot be written.
    """
    if getattr(args, "out", None) is not None:
        check_folder(args.out, "--out")
    if getattr(args, "json", None) is not None:
        check_file(args.json, "--json")
    _check_not_the_data(args)
    checkpoint, resume = getattr(args, "checkpoint", None), getattr(args, "resume", False)
    if resume and checkpoint is None:
        raise FreqviInputError("--resume continues from the file that --checkpoint names; give --checkpoint "
                               "PATH too.")
    if checkpoint is not None:
        check_checkpoint_path(checkpoint)
        if resume and not checkpoint.is_file():
            raise FreqviInputError(f"--resume: there is no checkpoint {str(checkpoint)!r} to continue from; "
                                   "run without --resume to start one.")


def _check_not_the_data(args: argparse.Namespace) -> None:
    """Refuses a ``--json`` or ``--checkpoint`` file that is the ``--data`` file: writing it would destroy
    the data."""
    data = getattr(args, "data", None)
    if data is None or not data.is_file():
        return
    for option in ("json", "checkpoint"):
        target = getattr(args, option, None)
        if target is not None and target.exists() and os.path.samefile(target, data):
            raise FreqviInputError(f"--{option} {str(target)!r} is the --data file; writing it would replace "
                                   "the data: give another path.")


def check_folder(path: Path, option: str) -> None:
    """Raises unless ``path`` is a folder where a file can be created, or can be made as one: probed by
    creating a temporary file in it, or a temporary folder in its nearest existing ancestor."""
    if path.exists():
        if not path.is_dir():
            raise FreqviInputError(f"{option}: {str(path)!r} exists and is not a folder.")
        _probe(path, option, folder=False)
        return
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise FreqviInputError(f"{option}: cannot create folder {str(path)!r}: {str(ancestor)!r} is not a "
                               "folder.")
    _probe(ancestor, option, folder=True)


def check_file(path: Path, option: str) -> None:
    """Raises unless ``path`` names a regular file or nothing, in an existing folder where a file can be
    created (probed by creating a temporary file there)."""
    if path.exists() and not path.is_file():
        raise FreqviInputError(f"{option}: {str(path)!r} exists and is not a regular file.")
    if not path.absolute().parent.is_dir():
        raise FreqviInputError(f"{option}: the folder of {str(path)!r} does not exist.")
    _probe(path.absolute().parent, option, folder=False)


def _probe(where: Path, option: str, folder: bool) -> None:
    """Creates a temporary file (or, ``folder``, a temporary folder) in ``where`` and removes it."""
    try:
        if folder:
            os.rmdir(tempfile.mkdtemp(dir=where, prefix=".freqvi-probe-"))
        else:
            handle, name = tempfile.mkstemp(dir=where, prefix=".freqvi-probe-")
            os.close(handle)
            os.unlink(name)
    except OSError as exc:
        raise FreqviInputError(f"{option}: nothing can be written in {str(where)!r} "
                               f"({exc.strerror or exc}); choose a writable folder.") from None

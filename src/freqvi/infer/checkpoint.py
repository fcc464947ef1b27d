"""Checkpoints: atomic writes, loads that never execute code, and every random state.

A checkpoint is one file written by :func:`torch.save` holding only tensors,
numbers, strings and containers of them (so :func:`torch.load` reads it with
``weights_only=True``): the run's state, serialised, and a JSON string of
metadata with the state's SHA-256 digest, so a changed byte is caught. It is written to a
temporary file in the same folder, flushed to disk and renamed over the old
one, so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from freqvi.errors import FreqviInputError

FORMAT = "freqvi-checkpoint-1"


def save_checkpoint(path: str | os.PathLike, state: dict, metadata: dict) -> None:
    """Writes ``state`` (tensors and plain values) and ``metadata`` (JSON) to ``path`` atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blob = buffer.getvalue()
    digest = hashlib.sha256(blob).hexdigest()
    payload = {"state": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
               "metadata": json.dumps({"format": FORMAT, "sha256": digest, **metadata})}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state, metadata)`` from a checkpoint; a missing, truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FreqviInputError(f"checkpoint {str(path)!r} does not exist.")
    try:
        payload = torch.load(path, weights_only=True)
        metadata = json.loads(payload["metadata"])
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
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        raise FreqviInputError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc}): it is truncated, "
            "tampered with or not a freqvi checkpoint."
        ) from None
    if metadata.get("format") != FORMAT:
        raise FreqviInputError(f"{str(path)!r} is not a {FORMAT} file (format {metadata.get('format')!r}).")
    return state, metadata


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

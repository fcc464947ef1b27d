"""Soak run: a VAE fit stopped three times by SIGTERM and resumed ends where an uninterrupted fit ends.

What it does: ``freqvi.models.VAE(64, 8)`` (bernoulli decoder, hidden layers 128 and
64, the same initial weights every time) fitted by ``freqvi.fit`` on
``freqvi.datasets.load_digits("train")`` (1,500 x 64) with the mean-field ELBO,
minibatches of 128, Adam at 1e-3, ``seed=0``, ``--steps`` steps, each fit in a fresh
single-threaded Python process:

* ``reference``: one uninterrupted fit;
* ``soak``: the same fit with ``checkpoint=..., checkpoint_seconds=30``, sent SIGTERM
  ``--after`` seconds into its fitting, three times, each time restarted with
  ``resume=`` from the checkpoint the interruption wrote; the fourth process runs to
  the end. The parent watches the checkpoint file and lists every write (the
  30-second ones and the interruptions').

The check: every parameter of the decoder and encoder at the end of the soak equals
the reference's bit for bit (``torch.equal``). Run ``python benchmarks/soak_resume.py``
(about ``2 * steps / (steps per second)`` plus start-ups: a few minutes).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

INTERRUPTIONS = 3


def child(steps: int, out: str, checkpoint: str | None, resume: bool) -> None:
    """One fit; saves the final parameters to ``out``; exits with 3 if interrupted."""
    import freqvi
    from freqvi.datasets import load_digits
    from freqvi.models import VAE

    torch.set_num_threads(1)  # every process alike, and none fighting the others for cores
    torch.manual_seed(0)
    vae = VAE(64, 8)
    x = load_digits("train")
    options = {} if checkpoint is None else {"checkpoint": checkpoint, "checkpoint_seconds": 30.0}
    if resume:
        options["resume"] = checkpoint
    print("fitting", flush=True)
    try:
        freqvi.fit(vae, x, loss="mean_field", batch_size=128, lr=1e-3, num_steps=steps, seed=0,
                   progress=False, **options)
    except KeyboardInterrupt as stop:
        print(stop, flush=True)
        sys.exit(3)
    torch.save({name: p.detach() for name, p in vae.named_parameters()}, out)


def launch(steps: int, out: Path, checkpoint: Path | None = None, resume: bool = False) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", "--steps", str(steps), "--out", str(out)]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)] + (["--resume"] if resume else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "fitting"
    return process


def watch(process: subprocess.Popen, checkpoint: Path, after: float | None) -> tuple[int, list[float]]:
    """Waits ``after`` seconds (or for the end), then SIGTERM; the exit code and the seconds of each write."""
    start, last, writes = time.monotonic(), _mtime(checkpoint), []
    while process.poll() is None and (after is None or time.monotonic() - start < after):
        time.sleep(0.2)
        if _mtime(checkpoint) != last:
            last = _mtime(checkpoint)
            writes.append(time.monotonic() - start)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    code = process.wait()
    if _mtime(checkpoint) != last:
        writes.append(time.monotonic() - start)
    return code, writes


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime_ns if path.exists() else None


def checkpoint_step(path: Path) -> int:
    from freqvi.infer.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--after", type=float, default=40.0, help="seconds of fitting before each SIGTERM")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.out, args.checkpoint, args.resume)
        return
    folder = Path(tempfile.mkdtemp(prefix="freqvi-soak-"))
    ckpt = folder / "vae.ckpt"
    start = time.monotonic()
    reference = launch(args.steps, folder / "reference.pt")
    assert reference.wait() == 0
    print(f"reference: {args.steps} steps uninterrupted in {time.monotonic() - start:.0f} s")
    for segment in range(INTERRUPTIONS + 1):
        process = launch(args.steps, folder / "soak.pt", ckpt, resume=segment > 0)
        code, writes = watch(process, ckpt, args.after if segment < INTERRUPTIONS else None)
        expected = 3 if segment < INTERRUPTIONS else 0
        if code != expected:
            sys.exit(f"segment {segment}: exit code {code}, expected {expected} (raise --steps if it ended)")
        print(f"segment {segment}: exit {code}, checkpoint at step {checkpoint_step(ckpt)}, written at "
              + ", ".join(f"{t:.1f}" for t in writes) + " s into the segment")
    ref = torch.load(folder / "reference.pt", weights_only=True)
    soak = torch.load(folder / "soak.pt", weights_only=True)
    same = [name for name in ref if torch.equal(ref[name], soak[name])]
    print(f"{len(same)} of {len(ref)} parameter tensors equal bit for bit; "
          f"total {time.monotonic() - start:.0f} s")
    sys.exit(0 if len(same) == len(ref) else 1)


if __name__ == "__main__":
    main()

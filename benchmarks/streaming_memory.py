"""Peak resident memory of fits streamed from a .npy file: n = 10^5 against n = 10^7 rows.

What it measures: a 10-D mixture of 3 full-covariance Gaussians, written to
``/tmp/freqvi-stream-<n>.npy`` (float32; 10^7 x 10 is 400 MB), fitted from
:class:`freqvi.datasets.NpyBatches` (10,000 rows a batch) by

* ``em``: online EM, ``freqvi.em(GaussianMixture(3, 10), batches, max_iter=1)``:
  the first pass to record the initial log-likelihood, one pass of online EM and
  one more to record the new log-likelihood (3 passes over the file);
* ``fit``: SVI, ``freqvi.fit(gm, None, batches, loss="enum", num_steps=300)``:
  300 batches (3 million rows of the 10^7, 30 passes over 10^5),

each in a fresh Python process, which reports its peak resident set size (Linux's
``VmHWM``; ``ru_maxrss`` would include the parent's memory at the fork) after the
fit, and before it (after the imports: the floor any run pays).
Pages of a memory-mapped file count as resident once touched; NpyBatches reads
each batch with its own ``numpy.fromfile`` at the batch's offset, so the page
cache holds the file, not the process. The target: the peak at 10^7 within 1.5
times the peak at 10^5.

Run ``python benchmarks/streaming_memory.py`` (minutes: the 10^7-row online EM reads
the 400 MB file three times; the file is written once and reused), ``--rows 100000
1000000`` for other sizes, ``--drivers fit`` for one driver.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 10_000
DIM, COMPONENTS = 10, 3


def write_mixture(path: Path, n: int, chunk: int = 1_000_000) -> None:
    """n rows of a fixed 3-component 10-D Gaussian mixture, written chunk by chunk."""
    if path.is_file() and np.load(path, mmap_mode="r").shape == (n, DIM):
        return
    rng = np.random.default_rng(0)
    locs = rng.normal(scale=4.0, size=(COMPONENTS, DIM))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        z = rng.integers(COMPONENTS, size=rows)
        out[start:start + rows] = (locs[z] + rng.normal(size=(rows, DIM))).astype(np.float32)
    out.flush()
    del out


def peak_mib() -> float:
    """This process's peak resident set size so far, MiB: ``VmHWM`` of ``/proc/self/status``.

    ``getrusage``'s ``ru_maxrss`` (the fallback off Linux) also counts the parent's
    resident memory at the fork that started this process, which ``exec`` keeps.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(row for row in status.read_text().splitlines() if row.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, driver: str) -> None:
    """Fits from ``path`` in this process; prints a JSON line of peaks and times."""
    import freqvi
    from freqvi.datasets import NpyBatches
    from freqvi.models import GaussianMixture

    batches = NpyBatches(path, BATCH, seed=0)
    gm = GaussianMixture(COMPONENTS, DIM)
    before = peak_mib()
    start = time.perf_counter()
    if driver == "em":
        freqvi.em(gm, batches, max_iter=1, seed=0, progress=False)
    else:
        freqvi.fit(gm, batches, loss="enum", num_steps=300, lr=0.01, seed=0, progress=False)
    print(json.dumps({"before_MiB": before, "peak_MiB": peak_mib(), "seconds": time.perf_counter() - start}))


def measure(path: Path, driver: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(path), driver], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[10**5, 10**7])
    parser.add_argument("--drivers", nargs="+", default=["em", "fit"], choices=["em", "fit"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    paths = {}
    for n in args.rows:
        paths[n] = Path(f"/tmp/freqvi-stream-{n}.npy")
        write_mixture(paths[n], n)
    small, large = args.rows
    print(f"{'driver':<6} {'rows':>10} {'file MiB':>9} {'before MiB':>11} {'peak MiB':>9} {'seconds':>8}")
    for driver in args.drivers:
        peaks = {}
        for n in args.rows:
            r = measure(paths[n], driver)
            peaks[n] = r["peak_MiB"]
            size = paths[n].stat().st_size / 2**20
            print(f"{driver:<6} {n:>10,} {size:>9.0f} {r['before_MiB']:>11.0f} {r['peak_MiB']:>9.0f} "
                  f"{r['seconds']:>8.1f}")
        ratio = peaks[large] / peaks[small]
        print(f"{driver}: peak at {large:,} / peak at {small:,} rows = {ratio:.3f} "
              f"({'within' if ratio <= 1.5 else 'OVER'} the 1.5 target)")


if __name__ == "__main__":
    main()

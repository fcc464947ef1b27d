"""Re-execute tutorial notebooks in full mode and write their outputs back in place.

Usage, from the repository root::

    python tutorials/regenerate.py                       # every tutorials/0*.ipynb
    python tutorials/regenerate.py 01 tutorials/03_variational_em_glmm.ipynb   # a stem prefix or a path

Each notebook runs top to bottom in a fresh kernel, in full mode (``FREQVI_SMOKE`` removed from the
kernel's environment), with one intra-op thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``), a
fixed ``PYTHONHASHSEED`` and the inline Matplotlib backend, from the ``tutorials/`` folder. The
notebooks set their own seeds, so a rerun on the same machine reproduces every number (two full runs
of all eight printed the same numbers); only the timings a notebook prints change. Another machine
whose BLAS takes another code path fits the stochastic models a little differently (the numbers in
``tests/test_tutorials.py``): regenerate on the machine that runs CI.

What the script writes is what the kernel produced, less what changes on every run without meaning
anything: the cells' execution timestamps (``metadata.execution``) and the kernel's temporary file
name that Python puts in front of a warning (``/tmp/ipykernel_<pid>/<hash>.py:<line>: ``), so that
``git diff`` after a rerun shows only what the code changed. The first error stops the notebook and
leaves its file untouched.

``tests/test_tutorials.py`` imports :func:`execute` to rerun each notebook in the same way and compare
the numbers it prints with the committed ones (``pytest --runslow tests/test_tutorials.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time
from pathlib import Path

import nbclient
import nbformat

TUTORIALS = Path(__file__).resolve().parent
CELL_TIMEOUT = 1800  # seconds per cell: far above any full-mode cell (each notebook takes 5-80 CPU s)

# "/tmp/ipykernel_4242/2104977840.py:3: " or, on Windows, "C:\...\ipykernel_4242\2104977840.py:3: "
KERNEL_FILE = re.compile(r"^\S*ipykernel_\d+[/\\]\d+\.py:\d+: ", re.MULTILINE)


def kernel_environment() -> dict[str, str]:
    """The environment of the kernel: this process's, in full mode, one thread, fixed hashing."""
    env = {k: v for k, v in os.environ.items() if k != "FREQVI_SMOKE"}
    env.update({
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures as display_data PNGs
    })
    return env


def execute(path: Path, timeout: int = CELL_TIMEOUT) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` in full mode in a fresh kernel and return it with its new outputs.

    Raises :class:`nbclient.exceptions.CellExecutionError` on the first cell that fails.
    """
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=kernel_environment())
    return scrub(notebook)


def scrub(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what changes on every run: execution timestamps and the kernel's file name in warnings."""
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == "stderr":
                output.text = KERNEL_FILE.sub("", output.text)
    return notebook


def resolve(names: list[str]) -> list[Path]:
    """Notebook paths from paths or stem prefixes ("01", "03_variational"); every tutorial if none."""
    every = sorted(TUTORIALS.glob("0*.ipynb"))
    if not names:
        return every
    paths = []
    for name in names:
        if Path(name).suffix == ".ipynb":
            if not Path(name).is_file():
                raise SystemExit(f"expected a notebook file, found no file at {name}")
            paths.append(Path(name).resolve())
            continue
        matches = [p for p in every if p.stem.startswith(name)]
        if len(matches) != 1:
            found = ", ".join(p.name for p in matches) or "none"
            raise SystemExit(f"expected one tutorial whose name starts with {name!r}, found {found}")
        paths.append(matches[0])
    return paths


def kernel_cpu_seconds() -> float:
    """CPU seconds of the finished kernels (children of this process), user plus system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="paths or name prefixes (default: every tutorial)")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    for path in resolve(args.notebooks):
        wall, cpu = time.perf_counter(), kernel_cpu_seconds()
        notebook = execute(path, args.timeout)
        nbformat.write(notebook, path)  # as Jupyter writes it: indented JSON, a final newline
        print(f"{path.name}: {time.perf_counter() - wall:.0f} s wall, "
              f"{kernel_cpu_seconds() - cpu:.0f} s CPU in the kernel", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

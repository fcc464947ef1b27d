"""Every tutorial notebook runs top to bottom in smoke mode (FREQVI_SMOKE=1) without an error."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_in_smoke_mode(path, monkeypatch):
    monkeypatch.setenv("FREQVI_SMOKE", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    # errors that do not stop a cell, e.g. a figure whose label fails to render
    errors = [f"cell {i}: {out.ename}: {out.evalue}" for i, cell in enumerate(notebook.cells)
              for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, errors


def test_every_tutorial_is_listed_in_the_readme():
    readme = (TUTORIALS / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, missing

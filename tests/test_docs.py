"""The documentation site: every public name has a reference page, and the site builds.

The fast tests read the ``.rst`` sources of ``docs/api`` (no Sphinx needed); the slow one
runs ``sphinx-build -W --keep-going`` as CI does.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import freqvi
from freqvi.errors import FreqviError, FreqviWarning

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SUBPACKAGES = ("models", "guides", "estimators", "infer")
# Modules without __all__: their public names are those defined in them without a leading _.
MODULES_WITHOUT_ALL = ("datasets", "plots", "errors")

_DIRECTIVE = re.compile(r"^\.\. (automodule|currentmodule|autosummary|autoclass|autofunction|autodata|"
                        r"autoexception)::\s*(\S*)")
_ENTRY = re.compile(r"^ {3}([A-Za-z_][\w.]*)\s*$")


def documented_names(api_dir: Path = DOCS / "api") -> set[str]:
    """Full names that the API sources give a reference entry (autosummary or autodoc)."""
    names: set[str] = set()
    for source in sorted(api_dir.glob("*.rst")):
        module, in_autosummary = None, False
        for line in source.read_text().splitlines():
            match = _DIRECTIVE.match(line)
            if match:
                kind, target = match.groups()
                in_autosummary = kind == "autosummary"
                if kind in ("automodule", "currentmodule"):
                    module = target
                if kind not in ("currentmodule", "autosummary"):
                    names.add(target)
            elif in_autosummary and (entry := _ENTRY.match(line)):
                names.add(f"{module}.{entry.group(1)}" if module else entry.group(1))
            elif line and not line.startswith(" "):
                in_autosummary = False
    return names


def public_names() -> dict[str, object]:
    """Every name a user is told about, as full name -> object."""
    names = {f"freqvi.{name}": getattr(freqvi, name) for name in freqvi.__all__}
    for package in SUBPACKAGES:
        module = importlib.import_module(f"freqvi.{package}")
        names.update({f"{module.__name__}.{name}": getattr(module, name) for name in module.__all__})
    for package in MODULES_WITHOUT_ALL:
        module = importlib.import_module(f"freqvi.{package}")
        names.update({f"{module.__name__}.{name}": obj for name, obj in vars(module).items()
                      if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__})
    return names


def test_reader_finds_autosummary_entries_under_their_module(tmp_path):
    (tmp_path / "page.rst").write_text(
        "Title\n=====\n\n.. automodule:: pkg.mod\n   :no-members:\n\n.. autosummary::\n"
        "   :toctree: generated\n\n   f\n   Klass\n\nText that ends the table.\n\n   not_an_entry\n\n"
        ".. autoclass:: pkg.other.Thing\n")
    assert documented_names(tmp_path) == {"pkg.mod", "pkg.mod.f", "pkg.mod.Klass", "pkg.other.Thing"}


def test_every_public_name_has_a_reference_page():
    documented = documented_names()
    top_level = {id(obj): f"freqvi.{name}" for name, obj in vars(freqvi).items() if name in freqvi.__all__}
    # A subpackage's name that freqvi re-exports is documented once, under its top-level name.
    missing = sorted(name for name, obj in public_names().items()
                     if name not in documented and top_level.get(id(obj)) not in documented)
    assert missing == []


def test_every_error_and_warning_class_is_documented():
    documented = documented_names()
    classes = set()
    for info in pkgutil.walk_packages(freqvi.__path__, "freqvi."):
        module = importlib.import_module(info.name)
        classes |= {f"{module.__name__}.{name}" for name, obj in vars(module).items()
                    if inspect.isclass(obj) and issubclass(obj, FreqviError | FreqviWarning)
                    and obj.__module__ == module.__name__}
    assert len(classes) >= 7  # the five of freqvi.errors and the two of the standard errors
    assert sorted(classes - documented) == []


def test_every_tutorial_is_rendered_with_a_title():
    """docs/tutorials is the tutorials folder, and each notebook opens with a heading (a toctree
    entry without one has no title to show)."""
    assert (DOCS / "tutorials").resolve() == (ROOT / "tutorials").resolve()
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert len(notebooks) >= 8
    for notebook in notebooks:
        first = json.loads(notebook.read_text())["cells"][0]
        assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# "), notebook.name


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install '.[docs]'")
    out = tmp_path / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d",
         str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, cwd=ROOT)
    assert build.returncode == 0, build.stderr[-5000:]
    fit_page = (out / "api" / "generated" / "freqvi.fit.html").read_text()
    assert "mathjax" in fit_page.lower() and r"\mathrm{ELBO}" in fit_page
    tutorial = (out / "tutorials" / "01_em_gaussian_mixture.html").read_text()
    assert "<img" in tutorial
    cli = (out / "api" / "cli.html").read_text()
    assert all(f"freqvi {command}" in cli for command in ("em", "vae", "diffusion", "tour"))

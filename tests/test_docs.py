"""The documentation site: every public name has a reference page, and the site builds.

The fast tests read the ``.rst`` sources of ``docs/api`` (no Sphinx needed); the slow one
runs ``sphinx-build -W --keep-going`` as CI does.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import freqvi
from freqvi.cli import build_parser
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


# The pages in reading order: the examples of a page may use what an earlier page defined.
# (guide/index.md's one line uses the pair that guide/variational_em.md defines.)
GUIDE_PAGES = ("index.md", "guide/em.md", "guide/variational_em.md", "guide/index.md",
               "guide/estimators.md", "guide/amortised_vi.md", "guide/vae.md", "guide/diffusion.md",
               "guide/inference.md", "guide/scale.md")
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
# Budgets of the examples' long runs cut down: the test checks that the calls are right.
BUDGET_CAPS = {"num_steps": 20, "max_iter": 5, "num_replicates": 3, "num_samples": 50, "num_draws": 5}


def python_blocks(page: str) -> list[str]:
    return _PYTHON_BLOCK.findall((DOCS / page).read_text())


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


def test_every_page_has_examples_and_each_compiles():
    pages = {"index.md", *(str(page.relative_to(DOCS)) for page in (DOCS / "guide").glob("*.md"))}
    assert pages == set(GUIDE_PAGES)
    for page in GUIDE_PAGES:
        blocks = python_blocks(page)
        assert blocks, page
        for block in blocks:
            compile(block, page, "exec")


def _capped(function):
    def run(*args, **kwargs):
        for name, cap in BUDGET_CAPS.items():
            if name in inspect.signature(function).parameters or name in kwargs:
                kwargs[name] = min(kwargs.get(name, cap), cap)
        if "progress" in inspect.signature(function).parameters:
            kwargs["progress"] = False
        return function(*args, **kwargs)
    return run


@pytest.mark.slow
def test_guide_examples_run(tmp_path, monkeypatch):
    """Every Python example of the landing page and the guide runs, in reading order, with its
    long runs cut short (warnings about those short runs are not this test's subject)."""
    monkeypatch.chdir(tmp_path)
    for name in ("fit", "em", "bootstrap", "log_likelihood", "compare", "amortization_gap",
                 "gradient_variance"):
        monkeypatch.setattr(freqvi, name, _capped(getattr(freqvi, name)))
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FreqviWarning)
        for page in GUIDE_PAGES:
            for number, block in enumerate(python_blocks(page)):
                exec(compile(block, f"{page}, example {number + 1}", "exec"), namespace)


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
    assert r"\mathrm{ELBO}" in fit_page
    assert '_static/mathjax/tex-mml-chtml.js"' in fit_page  # served with the site: renders offline
    assert (out / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    tutorial = (out / "tutorials" / "01_em_gaussian_mixture.html").read_text()
    assert "<img" in tutorial
    cli = re.sub(r"<[^>]+>", "", (out / "api" / "cli.html").read_text())
    commands = next(action.choices for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    assert sorted(commands) == ["diffusion", "em", "tour", "vae"]
    assert all(f"freqvi {command} [-h]" in cli for command in commands)
    assert "--out" in cli  # not typeset as an en dash

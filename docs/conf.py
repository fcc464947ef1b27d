"""Sphinx configuration of freqvi's documentation site.

Build it from the repository root with::

    pip install ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html

The tutorials are the committed notebooks of ``tutorials/`` (``docs/tutorials`` is a
link to that folder), rendered with their stored outputs and never executed here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The package is imported from this checkout's src/ (an installed freqvi of another
# checkout would otherwise document other docstrings).
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sphinx.pycode import ModuleAnalyzer  # noqa: E402

import freqvi  # noqa: E402

project = "freqvi"
author = "the freqvi developers"
copyright = "the freqvi developers, MIT licence"
release = version = freqvi.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "myst_nb",
]

exclude_patterns = ["_build", "tutorials/README.md", "**/.ipynb_checkpoints"]
templates_path = ["_templates"]
html_theme = "furo"
html_title = f"freqvi {version}"
html_static_path = ["_static"]
html_css_files = ["freqvi.css"]
# Quotes and ellipses only: "--out" must not become an en dash in the command's help.
smartquotes_action = "qe"

# ----- API reference -----------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
# Signatures read like the source (``str | ELBO``), descriptions carry the types.
autodoc_typehints = "signature"
# False: a driver wrapped by freqvi.infer.threads.thread_policy has one more default (num_threads) than
# its source, which the source-reading default preserver cannot match ("pop from empty list").
autodoc_preserve_defaults = False
# A method without a docstring stays without one (not torch.nn.Module.forward's text).
autodoc_inherit_docstrings = False

# Cross-references. Every reference to a freqvi name must resolve (nitpicky). No
# intersphinx mapping is shipped: the build runs without internet and no installed
# package ships Pyro's, PyTorch's, NumPy's, Matplotlib's or ArviZ's objects.inv, so names
# of those libraries render as code, unlinked, instead of as broken links.
nitpicky = True
EXTERNAL_PACKAGES = ("pyro", "torch", "numpy", "np", "arviz", "matplotlib", "sklearn", "scipy",
                     "tqdm", "argparse", "os", "pathlib", "collections", "typing", "dataclasses")
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(EXTERNAL_PACKAGES)})(\..*)?"),
    # builtins named in signatures and ``:param:`` types
    (r"py:(class|obj|data)", r"(int|float|str|bool|bytes|dict|list|tuple|object|callable|"
                             r"Callable|Mapping|Sequence|Iterable|Iterator|Path|PathLike|"
                             r"ELBO|PyroOptim|Figure|Tensor|None|Ellipsis)"),
]

# ----- math ------------------------------------------------------------------------------
# MathJax 3 is served with the site, so that math renders without internet: the docs extra
# installs django-static-mathjax, a plain copy of MathJax's files (its Django glue is unused).
# Without it the page loads MathJax from Sphinx's default CDN address instead.
_MATHJAX_PACKAGE = importlib.util.find_spec("mathjax")
MATHJAX_ES5 = (Path(_MATHJAX_PACKAGE.submodule_search_locations[0]) / "static" / "mathjax" / "es5"
               if _MATHJAX_PACKAGE else None)
# The loader, its CommonHTML fonts, and what it loads on demand (TeX extensions, the menu,
# accessibility and speech); MathJax's SVG and MathML-only bundles are left out.
MATHJAX_FILES = ("tex-mml-chtml.js", "output/chtml", "input/tex/extensions", "ui", "a11y", "sre")
if MATHJAX_ES5 is not None and (MATHJAX_ES5 / "tex-mml-chtml.js").is_file():
    mathjax_path = "mathjax/tex-mml-chtml.js"  # relative to _static


def _copy_mathjax(app, exception):
    if exception is not None or app.builder.format != "html" or "mathjax_path" not in globals():
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    for name in MATHJAX_FILES:
        source = MATHJAX_ES5 / name
        if source.is_dir():
            shutil.copytree(source, target / name, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


# ----- notebooks ---------------------------------------------------------------------------
nb_execution_mode = "off"  # rendered from the stored outputs: the test suite runs them
nb_output_stderr = "remove"  # progress bars and the like, not results
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]


def _defining_comment(name: str, obj) -> list[str]:
    """The ``#:`` comment above the assignment of ``obj`` in the freqvi module that defines it."""
    short = name.rsplit(".", 1)[-1]
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("freqvi.") and vars(module).get(short) is obj:
            comment = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", short))
            if comment:
                return list(comment)
    return []


def _constant_docstring(app, what, name, obj, options, lines):
    """A constant documented where it is re-exported (``freqvi.estimators.ESTIMATORS``) gets the
    ``#:`` comment of its definition; without one, no text rather than its type's docstring."""
    type_doc = (type(obj).__doc__ or "").strip()
    if what in ("data", "attribute") and lines and "\n".join(lines).strip() == type_doc:
        lines[:] = _defining_comment(name, obj)


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docstring)
    app.connect("build-finished", _copy_mathjax)

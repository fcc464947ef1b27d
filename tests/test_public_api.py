"""`import freqvi` reaches every name the README and the docstrings tell a user about."""

import importlib
import subprocess
import sys

import freqvi


def test_every_name_in_all_is_an_attribute():
    missing = [name for name in freqvi.__all__ if not hasattr(freqvi, name)]
    assert missing == []


def test_subpackages_the_readme_uses_are_attributes():
    x = freqvi.datasets.load_iris()
    assert x.shape == (150, 4)
    assert freqvi.plots is importlib.import_module("freqvi.plots")
    assert issubclass(freqvi.errors.FreqviInputError, freqvi.errors.FreqviError)


def test_plots_is_imported_on_first_use_only():
    code = "import sys, freqvi; print('matplotlib' in sys.modules, 'freqvi.plots' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

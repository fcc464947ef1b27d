"""Every Python block of README.md runs as printed, on its own, top to bottom, and prints briefly.

The blocks are read from the README itself (not a copy), each run in a fresh namespace with an
empty parameter store, as a reader pasting it into a new session would.
"""

import re
from pathlib import Path

import pyro
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::freqvi.errors.FreqviWarning")  # shown to a reader, not failures
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_as_written(block, capsys):
    pyro.clear_param_store()
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) < 60, "\n".join(printed)  # results print short: arrays stay attributes

"""The ``freqvi`` command under Ctrl-C, and its checkpoints: one line and exit status 130, never a
traceback; an interrupted run leaves a checkpoint that ``--resume`` continues bit for bit.

The Ctrl-C tests run the console script as installed (``freqvi_console:main``, see pyproject.toml) in a
child process and send it SIGINT.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from freqvi.cli import main
from freqvi.infer.checkpoint import load_checkpoint

SRC = Path(__file__).resolve().parent.parent / "src"
# What pip writes as the console script, with a hook that Ctrl-C's the process as torch starts importing:
# the interrupt falls inside the import of freqvi.cli, at a known place, on any machine.
SCRIPT = """
import os, signal, sys
from importlib.abc import MetaPathFinder

class CtrlCAtImport(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)
        return None

if {module!r}:
    sys.meta_path.insert(0, CtrlCAtImport())
from freqvi_console import main
sys.exit(main())
"""
VAE_RUN = ["vae", "--quiet", "--hidden", "16", "--batch-size", "64", "--num-samples", "30",
           "--gap-steps", "5", "--threads", "1"]


def _child(argv: list[str], cwd: Path, interrupt_at_import: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT.format(module=interrupt_at_import), *argv], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, child: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(tmp_path):
    child = _child(["em", "--quiet"], tmp_path, interrupt_at_import="torch")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert err == "freqvi: interrupted\n" and out == ""


def test_the_console_script_runs_the_command(tmp_path):
    child = _child(["--version"], tmp_path)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and out.startswith("freqvi ") and err == ""


def _metrics(folder: Path) -> dict:
    """metrics.json without its timings, which differ from run to run."""
    report = json.loads((folder / "metrics.json").read_text())
    for key in ("wall_time", "seconds_per_step"):
        report["fit"].pop(key)
    return report


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues_bit_for_bit(tmp_path, capsys):
    """The reference: the same command run uninterrupted, in this process, to the resumed run's last step."""
    checkpoint = tmp_path / "vae.ckpt"
    child = _child([*VAE_RUN, "--steps", "100000", "--out", str(tmp_path / "cut"), "--checkpoint",
                    str(checkpoint), "--checkpoint-every", "1"], tmp_path)
    _wait_for(checkpoint, child)  # the loop has begun
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == ("freqvi: interrupted: rerun with --resume to continue from the "
                                    f"checkpoint {str(checkpoint)!r}")
    assert not (tmp_path / "cut" / "metrics.json").exists()  # stopped before the evaluation
    stopped_at = load_checkpoint(checkpoint)[0]["step"]
    steps = ["--steps", str(stopped_at + 20)]
    assert main([*VAE_RUN, *steps, "--out", str(tmp_path / "resumed"), "--checkpoint", str(checkpoint),
                 "--resume"]) == 0
    assert main([*VAE_RUN, *steps, "--out", str(tmp_path / "whole")]) == 0
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "whole")
    assert _metrics(tmp_path / "whole")["fit"]["num_steps"] == stopped_at + 20


@pytest.mark.slow  # a child process that imports freqvi and trains: seconds
def test_a_second_ctrl_c_is_one_line_and_exit_130(tmp_path):
    checkpoint = tmp_path / "vae.ckpt"
    child = _child([*VAE_RUN, "--steps", "100000", "--out", str(tmp_path / "out"), "--checkpoint",
                    str(checkpoint), "--checkpoint-every", "1"], tmp_path)
    _wait_for(checkpoint, child)
    child.send_signal(signal.SIGINT)
    time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("freqvi: interrupted")
    load_checkpoint(checkpoint)  # intact: a write cut short leaves the previous checkpoint


DIFFUSION_RUN = ["diffusion", "--quiet", "--diffusion-steps", "20", "--hidden", "16", "--samples", "100",
                 "--threads", "1", "--ema-decay", "0.9"]


@pytest.mark.parametrize("command", [VAE_RUN, DIFFUSION_RUN], ids=["vae", "diffusion"])
def test_a_run_resumed_from_a_shorter_one_equals_the_uninterrupted_run(tmp_path, command):
    saving = ["--checkpoint", str(tmp_path / "run.ckpt")]
    assert main([*command, "--steps", "15", "--out", str(tmp_path / "first"), *saving]) == 0
    assert main([*command, "--steps", "30", "--out", str(tmp_path / "resumed"), *saving, "--resume"]) == 0
    assert main([*command, "--steps", "30", "--out", str(tmp_path / "whole")]) == 0
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "whole")
    assert _metrics(tmp_path / "first") != _metrics(tmp_path / "whole")  # the comparison can fail


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_em_resumed_from_a_shorter_run_equals_the_uninterrupted_one(tmp_path, capsys):
    checkpoint = tmp_path / "em.ckpt"
    em = ["em", "--quiet", "--components", "2", "--tol", "0"]
    assert main([*em, "--max-iter", "3", "--checkpoint", str(checkpoint)]) == 0
    assert main([*em, "--max-iter", "6", "--checkpoint", str(checkpoint), "--resume",
                 "--json", str(tmp_path / "resumed.json")]) == 0
    assert main([*em, "--max-iter", "6", "--json", str(tmp_path / "whole.json")]) == 0
    resumed, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "whole"))
    assert resumed["estimates"] == whole["estimates"]
    assert resumed["fit"]["objective_trace_total"] == whole["fit"]["objective_trace_total"]


def test_ctrl_c_during_em_stops_before_the_report_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """em hands back its result on Ctrl-C; the command then ends with 130 and the resume line, and writes
    no report of a fit it did not finish."""
    em_module = importlib.import_module("freqvi.infer.em")
    iterate, calls = em_module._EMStep.iterate, []

    def interrupted_iterate(self, posterior):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return iterate(self, posterior)

    monkeypatch.setattr(em_module._EMStep, "iterate", interrupted_iterate)
    checkpoint, report = tmp_path / "em.ckpt", tmp_path / "em.json"
    argv = ["em", "--quiet", "--tol", "0", "--checkpoint", str(checkpoint), "--json", str(report)]
    assert main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"freqvi: interrupted: rerun with --resume to continue from the checkpoint {str(checkpoint)!r}")
    assert not report.exists() and load_checkpoint(checkpoint)[0]["history"]["num_iter"] == 3

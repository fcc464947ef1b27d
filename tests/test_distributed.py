"""Data-parallel SVI: two gloo processes under torchrun equal one process over the same global batches."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_worker import BATCH, fit
from simulate import mixture_data

from freqvi.datasets import NpyBatches
from freqvi.errors import FreqviInputError

WORKER = Path(__file__).parent / "distributed_worker.py"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Launches the worker in 2 CPU processes; returns the data file and each process's results."""
    folder = tmp_path_factory.mktemp("ddp")
    path = folder / "x.npy"
    np.save(path, mixture_data(n=80, dtype=torch.float32)[:, :2].numpy())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(path), str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, path, [torch.load(folder / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]


def test_every_process_ends_with_the_same_parameters(two_processes):
    _, _, ranks = two_processes
    for run in ("shards", "streamed"):
        for name in ranks[0][run]:
            assert torch.equal(ranks[0][run][name], ranks[1][run][name]), (run, name)


def test_two_processes_equal_one_over_the_same_global_batches(two_processes):
    _, path, ranks = two_processes
    x = torch.from_numpy(np.load(path))
    references = {"shards": fit(x), "streamed": fit(NpyBatches(path, 2 * BATCH, shuffle=False))}
    for run, reference in references.items():
        for name, value in reference.items():
            # float32 sums in another order: a few ulps per step, over 12 steps
            torch.testing.assert_close(ranks[0][run][name], value, rtol=1e-5, atol=1e-6)


def test_only_process_0_writes_checkpoints(two_processes):
    folder, _, _ = two_processes
    assert (folder / "shards-0.ckpt").is_file()
    assert not (folder / "shards-1.ckpt").exists()


def test_distributed_without_a_process_group_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(FreqviInputError, match="launch the script with torchrun"):
        fit(torch.zeros(4, 2), distributed=True)

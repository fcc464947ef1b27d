"""Run by tests/test_distributed.py under torchrun: two data-parallel fits, each process saving its result.

Usage: python -m torch.distributed.run --nproc_per_node 2 distributed_worker.py DATA.npy OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.distributed

import freqvi
from freqvi.datasets import NpyBatches

BATCH = 10  # rows per process and step; the single-process reference takes 2 * BATCH


def mixture(x):
    """Two unit-variance 2-D Gaussian components, the assignment summed out by enumeration."""
    weights = pyro.param("weights", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.5]]))
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=x[i])


def no_latents(x):
    pass


def fit(data, **options) -> dict[str, torch.Tensor]:
    """A fresh fit of the mixture by Adam on the exact marginal likelihood; its parameters."""
    pyro.clear_param_store()
    freqvi.fit(mixture, data, no_latents, loss="enum", lr=0.05, num_steps=12, seed=0, progress=False,
               **options)
    return {name: pyro.param(name).detach().clone() for name in ("weights", "locs")}


def main(path: str, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x = torch.from_numpy(np.load(path))
    results = {
        # in memory: this process's rows, every step all of them (the plate stands for all n)
        "shards": fit(x[rank::size], distributed=True, checkpoint=Path(out) / f"shards-{rank}.ckpt"),
        # streamed: consecutive blocks of BATCH rows, process r taking blocks r, r + size, ...
        "streamed": fit(NpyBatches(path, BATCH, shuffle=False, rank=rank, world_size=size), distributed=True),
    }
    torch.save(results, Path(out) / f"rank-{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Data-parallel SVI on ``torch.distributed``: each process its shard, gradients averaged.

Launched with ``torchrun --nproc_per_node P script.py``, every process calls
:func:`freqvi.fit` with ``distributed=True`` and its own shard of the data. Each
step, every process estimates the full data's ELBO from its own batch (its plate
scaled to the global n), and the gradients and loss are averaged across
processes (one ``all_reduce``), so every process takes the same optimiser step
and the parameters stay identical: the step of a single process on the union of
the batches, since the mean of per-process sums scaled by ``n / b`` is the global
batch's sum scaled by ``n / (P b)``. Process 0 writes checkpoints and progress.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from freqvi.errors import FreqviInputError
from freqvi.infer.step import GuardedStep


class DataParallel:
    """The process group of a data-parallel run: this process's rank, and the collectives fit needs.

    Joins the group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ...) unless one is already initialised: gloo on the CPU, nccl on CUDA.
    """

    def __init__(self, device: torch.device | None):
        if not dist.is_available():
            raise FreqviInputError("distributed=True needs a PyTorch built with torch.distributed.")
        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise FreqviInputError(
                    "distributed=True found no process group: launch the script with torchrun "
                    "(torchrun --nproc_per_node 2 script.py) or call torch.distributed.init_process_group "
                    "first."
                )
            dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.device = device if device is not None else torch.device("cpu")

    @property
    def writer(self) -> bool:
        """Whether this process writes checkpoints and shows progress (rank 0)."""
        return self.rank == 0

    def total(self, count: int) -> int:
        """The sum over processes of ``count`` (the global number of observations)."""
        value = torch.tensor([count], dtype=torch.float64, device=self.device)
        dist.all_reduce(value)
        return int(value.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in some process (an interruption seen by one stops all)."""
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, params: list[torch.Tensor]) -> None:
        """Copies process 0's values of ``params`` into every process's, in place."""
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def gather(self, state: dict) -> list[dict]:
        """Every process's ``state`` (plain values and CPU tensors), in rank order."""
        states: list[dict | None] = [None] * self.size
        dist.all_gather_object(states, state)
        return states

    def average(self, loss: float, params: list[torch.Tensor]) -> float:
        """Replaces each parameter's gradient by its mean over processes; returns the mean loss.

        One flat buffer carries every gradient through one ``all_reduce`` (a parameter
        without a gradient here counts as zero), the loss another, in float64. A
        non-finite value in any process makes the mean non-finite everywhere, so all
        processes refuse the step together.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        total = torch.tensor([loss], dtype=torch.float64, device=flat.device)
        dist.all_reduce(flat)
        dist.all_reduce(total)
        flat /= self.size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(p)
            offset += g.numel()
        return float(total) / self.size


class AveragedStep(GuardedStep):
    """A :class:`~freqvi.infer.step.GuardedStep` whose gradients and loss are averaged over processes."""

    def __init__(self, group: DataParallel, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def _loss_and_grads(self, data) -> float:
        return self.group.average(super()._loss_and_grads(data), list(self.params.values()))

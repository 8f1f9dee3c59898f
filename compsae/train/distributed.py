"""Data-parallel training across processes (`torchrun`): who is who, and the few collectives the
trainer needs.

Every rank plans the same global batches (same loader, same seed) and reads only the r-th contiguous
slice of each (`local_rows`; `BatchLoader(part=(rank, world))`), which rank r trains on; the global
batch is gathered once, at step 0, for the decoder bias' initialisation.  Gradients are averaged by
DistributedDataParallel; the trainer weights each rank's loss by its share of the batch, so the
averaged gradient is exactly the gradient of the global batch mean (also when the last batch of an
epoch does not split evenly).  Everything that decides what happens next (loss terms, the latents
that fired, metrics) is all-reduced, so every rank takes the same decisions: identical parameters,
AuxK dead masks and k / m schedules on every rank.  Only rank 0 writes files.

Outside `torchrun` (no WORLD_SIZE in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def is_rank0() -> bool:
    """True in a single process and in rank 0 of a `torchrun` job (callable before the process
    group exists: it reads torchrun's RANK variable then)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def launched_world_size() -> int:
    """Processes in this job: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel job (rank 0 of 1 when there is no job)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that writes checkpoints, metrics and records."""
        return self.rank == 0

    def local_rows(self, n: int) -> slice:
        """This rank's contiguous share of `n` rows (sizes differ by at most one, rank order)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: CUDA device `local_rank` when training on CUDA."""
        if self.enabled and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place (returned for chaining); a no-op for one process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows `t: [n_rank, ...]` concatenated in rank order (the global batch when
        each rank holds its `local_rows` share); `t` itself for one process."""
        if not self.enabled:
            return t
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, t.detach().cpu())
        return torch.cat(parts).to(t.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (JSON-like data: run records, decisions, error messages)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_from_env(timeout_s: float = 1800.0) -> DistContext:
    """The job this process belongs to, starting the process group when `torchrun` launched several
    processes and nobody has started it yet (gloo for CPU tensors, plus NCCL for CUDA when a GPU is
    visible).  One process without torchrun gets `DistContext()`."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        from compsae.errors import UserError

        raise UserError(
            "this torch build has no torch.distributed; run training as one process (without "
            "torchrun)"
        )
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(_shutdown)
    return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _LossModule(nn.Module):
    """DDP synchronises gradients of what runs through `forward`; a model's loss is computed by
    `compute_loss`, so this adapter makes that the forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None) -> Any:
        return self.model.compute_loss(x, dead_mask=dead_mask)  # type: ignore[operator]


def wrap_loss(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """A module whose `forward(x, dead_mask)` is `model.compute_loss(x, dead_mask)`, with gradients
    averaged over ranks by DistributedDataParallel when `ctx` has several."""
    adapter = _LossModule(model)
    if not ctx.enabled:
        return adapter
    from torch.nn.parallel import DistributedDataParallel

    # the models have no buffers, so DDP's buffer sync has nothing to do
    # the pairwise composer's parameters sit out the steps before its term joins the reconstruction
    return DistributedDataParallel(
        adapter,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )

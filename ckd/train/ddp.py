"""DistributedDataParallel under torchrun: nccl on GPU, gloo on CPU. Single process when
WORLD_SIZE is unset or 1 (every helper then degrades to a no-op)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ckd.dist import destroy_group, dist_context, init_group
from ckd.options import default_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group (so we tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Device and process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    want = device or default_device()
    rank, world = dist_context()
    if world <= 1:
        return DistInfo(device=torch.device(want))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.device(want).type == "cuda":
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    owns = init_group(backend)
    return DistInfo(*dist_context(), local, dev, owns)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    destroy_group(info.owns_group)


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's BatchNorm running stats to every rank. DDP syncs buffers at the start of
    each forward, so after an epoch's last step each rank holds its own batch's update;
    call this before evaluating or saving so every rank holds the same model."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)

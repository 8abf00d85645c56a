"""The process group under `torchrun`, for every stage (cache building and training).

Single process when WORLD_SIZE is unset or 1: every helper then degrades to a no-op. A
group this process creates is also the one it destroys; one the caller created is left
alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch.distributed as dist


def dist_context() -> tuple[int, int]:
    """(rank, world_size) from the initialized group, else torchrun's RANK/WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_group(backend: str) -> bool:
    """Create the process group under torchrun when none exists; True if this call made
    it (so the caller destroys it with `destroy_group`)."""
    if dist_context()[1] <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend=backend)
    return True


def destroy_group(owned: bool) -> None:
    if owned and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str) -> Iterator[None]:
    owned = init_group(backend)
    try:
        yield
    finally:
        destroy_group(owned)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

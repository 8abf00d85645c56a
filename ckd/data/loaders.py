"""Training loaders: `ffcv` (reads a .beton) and `memory` (the whole uint8 split held in
memory on the device, gathered by the permutation: the fast path for CIFAR-sized data).

Both backends visit samples in the SAME order, a pure function of (seed, epoch):
`epoch_permutation` seeds a torch.Generator with a 63-bit mix of (seed, epoch) and draws
`randperm(N)`; the ffcv backend feeds that permutation to FFCV through a custom
`TraversalOrder` (`PermutationOrder`). Batches are (images uint8 [B,32,32,3], labels
int64 [B], indices int64 [B]) on `device`; indices are positions in the split.

`order="shard-blocks"` (`shard_block_permutation`): the samples are cut into blocks of
`block` consecutive indices (a logit cache's sample chunks, its shards); the epoch visits
the blocks in a permuted order and each block's samples, permuted, one after another, so
a reader holding a few blocks fetches each shard once per epoch (requests proportional to
the number of shards, not samples). Still a pure function of (seed, epoch, n, block),
computed before sharding, so identical for every world size.

Sharding (`world_size > 1`): rank r takes `order[r::world_size]` of the epoch order, so
ranks are disjoint and every rank has the same number of samples and batches:
- `drop_last=False`: the epoch order is first padded by wrapping around (its first
  `(-N) % world_size` entries repeat, as torch's DistributedSampler does), so every index
  is seen at least once and exactly once when world_size divides N;
- `drop_last=True`: the tail `N % world_size` of the epoch order is dropped (no repeats),
  then each rank drops its final partial batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from ckd.hashing import splitmix64

from .beton import ffcv_epoch, ffcv_workers, keep_torch_threads, read_beton
from .datasets import Split

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
KINDS = ("ffcv", "memory")


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The epoch's visiting order of 0..n-1 (int64, CPU): pure function of (seed, epoch)."""
    if not shuffle:
        return torch.arange(n, dtype=torch.int64)
    g = torch.Generator(device="cpu")
    g.manual_seed(splitmix64(seed, epoch))
    return torch.randperm(n, generator=g, dtype=torch.int64)


def shard_block_permutation(n: int, block: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's visiting order of 0..n-1 by whole blocks of `block` indices: the blocks
    permuted, then each block's indices permuted (int64, CPU)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    g = torch.Generator(device="cpu")
    g.manual_seed(splitmix64(seed, epoch))
    parts = []
    for b in torch.randperm(-(-n // block), generator=g).tolist():
        lo, hi = b * block, min(n, (b + 1) * block)
        parts.append(lo + torch.randperm(hi - lo, generator=g, dtype=torch.int64))
    return torch.cat(parts)


def shard_order(order: torch.Tensor, rank: int, world_size: int, batch_size: int,
                drop_last: bool) -> torch.Tensor:
    """This rank's strided share of the epoch order (see the module docstring)."""
    n = order.numel()
    if world_size > 1:
        if drop_last:
            order = order[: n - n % world_size]
        elif n % world_size:
            reps = -(-(world_size - n % world_size) // n)  # n < world_size: wrap repeatedly
            order = torch.cat([order] + [order] * reps)[: n + (-n) % world_size]
        order = order[rank::world_size]
    if drop_last:
        order = order[: order.numel() - order.numel() % batch_size]
    return order


class Loader:
    """The epoch order and sharding every training loader shares (`order(epoch)`,
    `set_epoch`, `len()`: batches per rank); subclasses iterate their batches."""

    def __init__(self, n: int, *, batch_size: int, seed: int, shuffle: bool, drop_last: bool,
                 device: str | torch.device, rank: int, world_size: int,
                 block: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if n < 1:
            raise ValueError("cannot load an empty split")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.block = block  # None: a random permutation; else whole blocks of this size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation for `epoch` (used by the next iteration)."""
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample order (int64, CPU) for `epoch` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        perm = shard_block_permutation(self.n, self.block, self.seed, e) \
            if self.block and self.shuffle else epoch_permutation(self.n, self.seed, e,
                                                                  self.shuffle)
        return shard_order(perm, self.rank, self.world_size, self.batch_size, self.drop_last)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (same arithmetic as `shard_order`)."""
        m = self.n
        if self.world_size > 1:
            m = m // self.world_size if self.drop_last else -(-m // self.world_size)
        return m - m % self.batch_size if self.drop_last else m

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)


class MemoryLoader(Loader):
    """Whole split held in memory on `device`; each batch is one gather by the permutation.

    On CPU the gather is numpy's `take` (torch's CPU index_select measured 10x slower and
    erratic once ffcv/numba share the process); on CUDA it is `index_select` on the GPU."""

    def __init__(self, split: Split, **kw) -> None:
        super().__init__(len(split), **kw)
        self._cpu = self.device.type == "cpu"
        if self._cpu:
            self.images, self.labels = split.images, split.labels
        else:
            self.images = torch.from_numpy(split.images).to(self.device)
            self.labels = torch.from_numpy(split.labels).to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        order = self.order()
        if not self._cpu:
            order = order.to(self.device)
        for s in range(0, order.numel(), self.batch_size):
            idx = order[s: s + self.batch_size]
            if self._cpu:
                i = idx.numpy()
                yield (torch.from_numpy(np.take(self.images, i, axis=0)),
                       torch.from_numpy(np.take(self.labels, i)), idx)
            else:
                yield self.images.index_select(0, idx), self.labels.index_select(0, idx), idx


def _permutation_order_cls():
    from ffcv.traversal_order.base import TraversalOrder  # noqa: PLC0415 - heavy import

    class PermutationOrder(TraversalOrder):
        """FFCV traversal order that replays `owner.order(epoch)`.

        ffcv 1.0.2 calls `order(loader)` on a TraversalOrder *instance*, so the instance is
        callable and binds itself to the ffcv loader."""

        def __init__(self, owner: Loader) -> None:  # no super(): bound in __call__
            self.owner = owner

        def __call__(self, loader) -> PermutationOrder:
            self.loader, self.indices, self.seed = loader, loader.indices, loader.seed
            self.distributed, self.sampler = False, None
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.owner.order(epoch).numpy().astype(np.uint64)

    return PermutationOrder


class FfcvLoader(Loader):
    """Reads a .beton with FFCV in the shared permutation order; batches are copied out of
    FFCV's reused buffers and moved to `device`."""

    def __init__(self, path: str | Path, **kw) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such .beton; create it with `ckd prepare`")
        with keep_torch_threads():
            from ffcv.loader import Loader  # noqa: PLC0415 - optional heavy dependency (ffcv)
            from ffcv.reader import Reader  # noqa: PLC0415 - optional heavy dependency (ffcv)

            super().__init__(Reader(str(path)).num_samples, **kw)
            self.path = path
            self._ffcv = Loader(str(path), batch_size=self.batch_size,
                                num_workers=ffcv_workers(), os_cache=True,
                                order=_permutation_order_cls()(self), drop_last=False,
                                seed=self.seed)

    def __iter__(self) -> Iterator[Batch]:
        self._ffcv.next_epoch = self.epoch  # ffcv asks the order for `next_epoch`
        nb = self.device.type == "cuda"
        with closing(ffcv_epoch(self._ffcv)) as batches:
            for img, lab, idx in batches:
                # Copy out of ffcv's reused buffers. numpy's copy, not torch's clone: measured
                # ~5x faster on 2 cores (torch's threaded copy competes with ffcv's threads).
                yield (_copy(img).to(self.device, non_blocking=nb),
                       _copy(lab).reshape(-1).to(self.device, non_blocking=nb),
                       _copy(idx).reshape(-1).to(self.device, non_blocking=nb))


def _copy(x) -> torch.Tensor:
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return torch.from_numpy(arr.copy())  # labels/indices: IntField decodes to int64


def make_loader(kind: str, source: Split | str | Path, *, batch_size: int, seed: int,
                shuffle: bool = True, drop_last: bool = False,
                device: str | torch.device = "cpu", rank: int = 0,
                world_size: int = 1, block: int | None = None) -> MemoryLoader | FfcvLoader:
    """`kind='memory'`: `source` is a Split (or a .beton path, read fully into memory);
    `kind='ffcv'`: `source` is a .beton path; `block`: visit whole blocks of that many
    samples (shard-block order). See the module docstring for order/sharding."""
    kw = dict(batch_size=batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
              device=device, rank=rank, world_size=world_size, block=block)
    if kind == "memory":
        if not isinstance(source, Split):
            source = read_beton(source)
        return MemoryLoader(source, **kw)
    if kind == "ffcv":
        if isinstance(source, Split):
            raise TypeError("the ffcv loader reads a .beton path; write one with "
                            "`ckd prepare` (or use kind='memory' for an in-memory Split)")
        return FfcvLoader(source, **kw)
    raise ValueError(f"unknown loader kind {kind!r}; valid kinds: {', '.join(KINDS)}")

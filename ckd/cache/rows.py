"""What a row source is and what it returns.

A *row source* serves a training step the cached rows of its samples: `memory.py` (the
whole cache decompressed once), `stream.py` (one row per sample and epoch, read ahead by a
background thread) and `blocks.py` (a bounded window of whole units). They differ only in
where rows come from; `RowSource` is what callers (the trainer, `ckd aid`, benchmarks)
use, and `open_cache` (`sources.py`) picks one.

What comes back depends on what the mentors stored, not on the source: `RowBatch` holds
the logits (a `[M, B, C]` view of rows padded to 16 bytes, `ckd.row_align`, when every
mentor is dense; `SparseMentors` when one is sparse, docs/SPARSE.md), their row statistics
and the requested mentor features. `dense_rows` and `mentor_rows` build it, once for all
sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from ckd.kernels.sparse_mentors import SparseMentors, stack

from .sparse import rows_to_sparse

Logits = torch.Tensor | SparseMentors


class RowBatch(NamedTuple):
    """One step's cached rows: `logits` [M, B, C] (store dtype) or `SparseMentors`;
    `stats` [M, B, K] fp32 (`stat_fields`) when asked for, else None; `features`
    {name: one fp32 [B, *shape] tensor per mentor} for the features asked for."""

    logits: Logits
    stats: torch.Tensor | None
    features: dict[str, list[torch.Tensor]]


@runtime_checkable
class RowSource(Protocol):
    """Cached rows for training steps. Every source also describes its cache: `mentors`,
    `num_classes`, `stat_fields`, `logits_modes`, `feature_shapes`, `mentor_meta`, `path`,
    `check_compatible(...)` and `epoch_views(epoch, indices, seed) -> (slots, view_ids)`
    (which cached row a sample uses in an epoch; `ckd.cache.reader.CacheReader`)."""

    mode: str
    mentors: list[str]
    num_classes: int
    stat_fields: tuple[str, ...]
    logits_modes: dict[str, str]
    feature_shapes: dict[str, list[tuple[int, ...]]]
    mentor_meta: dict[str, dict[str, Any]]  # each mentor's stored attributes (JSON)
    path: object  # where the cache is: a Path or an object-store location

    @property
    def sparse(self) -> bool:
        """Some mentor is stored sparse: `logits` come back as `SparseMentors`."""

    def check_compatible(self, dataset_name: str | None = None,
                         fingerprint: str | None = None,
                         num_classes: int | None = None) -> None: ...

    def epoch_views(self, epoch: int, indices: torch.Tensor, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def start_epoch(self, epoch: int, seed: int, indices: torch.Tensor | None = None
                    ) -> None:
        """Get ready for `epoch` (`indices`: the samples this rank uses, default all)."""

    def gather_rows(self, slots: torch.Tensor, indices: torch.Tensor,
                    mentors: Sequence[str] | None = None, *, with_stats: bool = False,
                    features: Sequence[str] = ()) -> RowBatch:
        """The rows of sample `indices[b]` in slot `slots[b]` (slots from `epoch_views`)."""

    def gather(self, slots: torch.Tensor, indices: torch.Tensor,
               mentors: Sequence[str] | None = None, with_stats: bool = False
               ) -> Logits | tuple[Logits, torch.Tensor]:
        """`gather_rows(...).logits` (with `with_stats`: `(logits, stats)`)."""

    def close(self) -> None: ...


def dense_rows(logits: torch.Tensor, stats: torch.Tensor | None, num_classes: int,
               device: torch.device) -> RowBatch:
    """Rows of dense mentors: `logits` [M, B, padded width] (the padded layout kept: the
    result is its `[..., :C]` view) and `stats` [M, B, K] moved to `device`."""
    out = logits.to(device, non_blocking=True)[..., :num_classes]
    if stats is not None:
        stats = stats.to(device, non_blocking=True)
    return RowBatch(out, stats, {})


def mentor_rows(arrays: Sequence[dict[str, torch.Tensor]], modes: Sequence[str],
                num_classes: int, device: torch.device, with_stats: bool) -> RowBatch:
    """Rows given per mentor as {array name: [B, ...]} (its step arrays, `stats` among
    them): stacked dense rows when every mentor is dense, else `SparseMentors` (a dense
    mentor of a mixed set as exact K = C rows)."""
    if all(m == "dense" for m in modes):
        return dense_rows(torch.stack([a["logits"] for a in arrays]),
                          torch.stack([a["stats"] for a in arrays]) if with_stats else None,
                          num_classes, device)
    parts, stats = [], []
    for named, mode in zip(arrays, modes, strict=True):
        named = dict(named)
        st = named.pop("stats")
        parts.append(rows_to_sparse(mode, num_classes, named, st))
        stats.append(st)
    out = stack(parts).to(device)
    return RowBatch(out, torch.stack(stats).to(device) if with_stats else None, {})


def feature_rows(tables: dict[str, list[torch.Tensor]], rows: torch.Tensor,
                 device: torch.device) -> dict[str, list[torch.Tensor]]:
    """{name: [rows of each mentor's table, fp32 on `device`]}: what an online mentor's
    `forward(x, is_feat=True)` gives for the same samples."""
    return {name: [t.index_select(0, rows.to(t.device)).to(device).float() for t in per]
            for name, per in tables.items()}


def as_request(slots: torch.Tensor, indices: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, indices) as int64 tensors, refused unless 1-D of the same length."""
    slots = torch.as_tensor(slots, dtype=torch.int64)
    indices = torch.as_tensor(indices, dtype=torch.int64)
    if slots.shape != indices.shape or slots.ndim != 1:
        raise ValueError(f"slots {tuple(slots.shape)} and indices {tuple(indices.shape)} "
                         "must be 1-D of the same length")
    return slots, indices


__all__ = ["RowBatch", "RowSource", "dense_rows", "mentor_rows", "feature_rows", "as_request"]

"""`BlockRows`: serve a step's cached rows from a bounded window of whole units (no epoch
buffer), for caches too big for `memory` mode and epochs too big for `stream`'s [M, N, C]
buffer, e.g. on an object store.

Each gather reads the (slot chunk, sample block) units its rows fall in that are not in
the window (least recently used first out), each read checked against its unit checksum.
The requests an epoch makes therefore depend on the epoch order: a random permutation
touches up to one unit per row once the window is full (requests proportional to
samples); `--order shard-blocks` visits whole blocks one after another, so each unit is
read once per epoch (requests proportional to shards).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ckd.row_align import padded_width

from .reader import CacheReader
from .rows import RowBatch, dense_rows

WINDOW = 4  # units held by default (each: every mentor's logits and stats)


class BlockRows(CacheReader):
    """Dense rows through a window of at most `window` units, each holding every mentor's
    logits and stats (it reads nothing up front)."""

    mode = "blocks"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 mentors: Sequence[str] | None = None, features: Sequence[str] = (),
                 window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 unit, got {window}")
        super().__init__(path, device, mentors, features)
        if self.sparse or self.features:
            raise ValueError("--cache-mode blocks serves dense logits and stats only (no "
                             "sparse mentors, no features): use --cache-mode memory or stream")
        self.window = int(window)
        self.units: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = \
            OrderedDict()
        self.reads = 0  # units read so far (each: 2 chunk reads per mentor)

    def close(self) -> None:
        self.units.clear()

    def _unit(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        key = (a, b)
        if key in self.units:
            self.units.move_to_end(key)
            return self.units[key]
        lay = self.layout
        sl, sm = lay.slot_range(a), lay.sample_range(b)
        region = (slice(sl.start, sl.stop), slice(sm.start, sm.stop))
        logits = np.stack([self.read_checked(m, "logits", *region) for m in self.mentors])
        stats = np.stack([self.read_checked(m, "stats", *region) for m in self.mentors])
        self.reads += 1
        self.units[key] = (logits, stats)
        while len(self.units) > self.window:
            self.units.popitem(last=False)
        return logits, stats

    def _rows(self, slots: torch.Tensor, indices: torch.Tensor, chosen: list[str],
              with_stats: bool, features: tuple[str, ...]) -> RowBatch:
        lay, c = self.layout, self.num_classes
        slots_np, idx = slots.cpu().numpy(), indices.cpu().numpy()
        a_of, b_of = slots_np // lay.slots_per_chunk, idx // lay.samples_per_chunk
        m, dtype = len(self.mentors), np.dtype(lay.dtype)
        # rows padded to 16 bytes (ckd.row_align), as the other sources return them
        full = np.zeros((m, len(idx), padded_width(c, dtype)), dtype=dtype)
        out = full[..., :c]
        stats = np.empty((m, len(idx), len(self.stat_fields)), dtype=np.float32)
        pairs = np.stack([a_of, b_of], 1)
        _, first = np.unique(pairs, axis=0, return_index=True)
        for a, b in (pairs[i] for i in sorted(first)):  # in the batch's order
            rows = np.nonzero((a_of == a) & (b_of == b))[0]
            logits, st = self._unit(int(a), int(b))
            si = slots_np[rows] - int(a) * lay.slots_per_chunk
            ni = idx[rows] - int(b) * lay.samples_per_chunk
            out[:, rows], stats[:, rows] = logits[:, si, ni], st[:, si, ni]
        res, res_stats = torch.from_numpy(full), torch.from_numpy(stats)
        if chosen != self.mentors:
            sel = torch.tensor([self.mentors.index(x) for x in chosen])
            res, res_stats = res[sel], res_stats[sel]
        return dense_rows(res, res_stats if with_stats else None, c, self.device)


__all__ = ["BlockRows", "WINDOW"]

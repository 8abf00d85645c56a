"""`BlockReader`: serve a step's cached rows from a bounded window of whole chunks (no
epoch buffer), for caches too big for `memory` mode and epochs too big for `stream`'s
[M, N, C] buffer, e.g. on an object store.

Each gather reads the (slot chunk, sample block) units its rows fall in that are not in
the window (least recently used first out), each read checked against its unit checksum
as `LogitCache` does. The requests an epoch makes therefore depend on the epoch order: a
random permutation touches up to one unit per row once the window is full (requests
proportional to samples); `--order shard-blocks` visits whole blocks one after another,
so each unit is read once per epoch (requests proportional to shards).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .reader import LogitCache


class BlockReader:
    """Rows of `cache` (opened in stream mode: it reads nothing up front) through a window
    of at most `window` units, each holding every mentor's logits and stats."""

    def __init__(self, cache: LogitCache, window: int = 4) -> None:
        if cache.sparse or cache.features:
            raise ValueError("--cache-mode blocks serves dense logits and stats only (no "
                             "sparse mentors, no features): use --cache-mode memory or stream")
        if window < 1:
            raise ValueError(f"window must be >= 1 unit, got {window}")
        self.cache, self.window = cache, int(window)
        self.units: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = \
            OrderedDict()
        self.reads = 0  # units read so far (each: 2 chunk reads per mentor)

    def __getattr__(self, name: str) -> Any:
        """Everything else (mentors, layout, epoch_views, check_compatible, ...) is the
        cache's: a BlockReader stands in for a LogitCache in the trainer."""
        if name == "cache":
            raise AttributeError(name)
        return getattr(self.cache, name)

    def start_epoch(self, epoch: int, seed: int, indices: torch.Tensor | None = None
                    ) -> None:
        """Nothing to plan: units are read when a step first needs them."""

    def close(self) -> None:
        self.units.clear()
        self.cache.close()

    def _unit(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        key = (a, b)
        if key in self.units:
            self.units.move_to_end(key)
            return self.units[key]
        lay, c = self.cache.layout, self.cache
        sl, sm = lay.slot_range(a), lay.sample_range(b)
        region = (slice(sl.start, sl.stop), slice(sm.start, sm.stop))
        logits = np.stack([c._read_checked(m, "logits", *region) for m in c.mentors])
        stats = np.stack([c._read_checked(m, "stats", *region) for m in c.mentors])
        self.reads += 1
        self.units[key] = (logits, stats)
        while len(self.units) > self.window:
            self.units.popitem(last=False)
        return logits, stats

    def gather(self, slots: torch.Tensor, indices: torch.Tensor,
               mentors: Sequence[str] | None = None, with_stats: bool = False) -> Any:
        """As `LogitCache.gather`: logits [M, B, C] (and stats [M, B, K])."""
        lay, c = self.cache.layout, self.cache
        slots = torch.as_tensor(slots, dtype=torch.int64).cpu().numpy()
        idx = torch.as_tensor(indices, dtype=torch.int64).cpu().numpy()
        a_of, b_of = slots // lay.slots_per_chunk, idx // lay.samples_per_chunk
        m = len(c.mentors)
        out = np.empty((m, len(idx), c.num_classes), dtype=np.dtype(lay.dtype))
        stats = np.empty((m, len(idx), len(c.stat_fields)), dtype=np.float32)
        pairs = np.stack([a_of, b_of], 1)
        _, first = np.unique(pairs, axis=0, return_index=True)
        for a, b in (pairs[i] for i in sorted(first)):  # in the batch's order
            rows = np.nonzero((a_of == a) & (b_of == b))[0]
            logits, st = self._unit(int(a), int(b))
            si = slots[rows] - int(a) * lay.slots_per_chunk
            ni = idx[rows] - int(b) * lay.samples_per_chunk
            out[:, rows], stats[:, rows] = logits[:, si, ni], st[:, si, ni]
        res, res_stats = torch.from_numpy(out), torch.from_numpy(stats)
        if mentors is not None:
            sel = torch.tensor([c.mentors.index(x) for x in mentors])
            res, res_stats = res[sel], res_stats[sel]
        res, res_stats = res.to(c.device), res_stats.to(c.device)
        return (res, res_stats) if with_stats else res

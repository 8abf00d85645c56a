"""`StreamRows`: a row source that never holds the whole cache.

An epoch uses exactly one slot per sample (`epoch_views`), so its working set is one row per
sample and mentor of each array a step reads ([N, C] logits, or a sparse mentor's [N, K]
ids/values, plus its stats and [N, *shape] per feature read). `start_epoch(e, seed)` plans
epoch e (and prefetches e + 1) and a background thread reads the store in chunk order,
picking each sample's planned row into an epoch buffer; `gather_rows` waits only for the
sample blocks it needs. It returns exactly what `MemoryRows` returns for the same rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckd.row_align import padded_width

from .layout import CacheMismatchError, CacheReadError
from .reader import CacheReader
from .rows import RowBatch, feature_rows, mentor_rows


def need_order(indices: torch.Tensor, layout: Any) -> list[int]:
    """Every sample block, those of `indices` first in the order they first appear there."""
    blocks = (torch.as_tensor(indices, dtype=torch.int64).cpu()
              // layout.samples_per_chunk).numpy()
    _, first = np.unique(blocks, return_index=True)
    seen = [int(blocks[i]) for i in sorted(first)]
    rest = sorted(set(range(layout.grid[1])) - set(seen))
    return seen + rest


class _Plan:
    """One epoch's rows: slot per sample (-1: not needed) and the buffers being filled, one
    [N, *row shape] array per mentor and array read (numpy-backed: the reader thread writes
    rows with numpy indexing, which every stored dtype supports; `gather` reads them as
    tensors sharing the memory)."""

    def __init__(self, key: Any, slots: torch.Tensor,
                 arrays: dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]],
                 num_blocks: int, block: int, pad_logits: bool = False) -> None:
        self.key = key
        self.slots = slots  # int64 [N], -1 where the sample is not in the plan
        self.rows: dict[str, dict[str, np.ndarray]] = {}  # what the reader thread fills
        self.bufs: dict[str, dict[str, torch.Tensor]] = {}  # what `gather` reads
        for alias, named in arrays.items():
            self.rows[alias], self.bufs[alias] = {}, {}
            for name, (shape, dtype) in named.items():
                # dense logit rows padded to 16 bytes (ckd.row_align): 128-bit loads downstream
                pad = pad_logits and name == "logits"
                width = padded_width(shape[-1], dtype) if pad else shape[-1]
                full = np.zeros((len(slots), *shape[:-1], width), dtype=dtype)
                self.rows[alias][name] = full[..., :shape[-1]]
                self.bufs[alias][name] = torch.from_numpy(full)
        self.ready = [threading.Event() for _ in range(num_blocks)]
        self.block = block
        self.error: BaseException | None = None
        self.cancelled = False  # dropped before the reader got to it: skip the IO
        self.block_order: list[int] = list(range(num_blocks))  # the order _fill reads


class StreamRows(CacheReader):
    """Rows read ahead epoch by epoch into one [N, ...] buffer per mentor and array."""

    mode = "stream"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 mentors: Sequence[str] | None = None, features: Sequence[str] = ()) -> None:
        super().__init__(path, device, mentors, features)
        self._plans: dict[Any, _Plan] = {}
        self._current: _Plan | None = None
        self._queue: queue.Queue[_Plan | None] = queue.Queue()
        self._thread = threading.Thread(target=self._worker, daemon=True,
                                        name="ckd-cache-stream")
        self._thread.start()

    def start_epoch(self, epoch: int, seed: int, indices: torch.Tensor | None = None) -> None:
        """Make `epoch` current (planning it unless prefetched) and prefetch `epoch + 1`.
        `indices`: the samples this rank will use (default all)."""
        idx = torch.arange(self.num_samples) if indices is None else \
            torch.as_tensor(indices, dtype=torch.int64).cpu()
        key = (int(epoch), int(seed), len(idx), int(idx.sum()))
        plan = self._plans.get(key) or self._schedule(key, epoch, seed, idx)
        self._current = plan
        nxt = (int(epoch) + 1, int(seed), len(idx), int(idx.sum()))
        if nxt not in self._plans:
            self._schedule(nxt, epoch + 1, seed, idx)
        for k in [k for k in self._plans if k not in (key, nxt)]:
            self._plans.pop(k).cancelled = True  # drop other epochs (their buffers)

    def plan_epoch(self, slots: torch.Tensor, indices: torch.Tensor) -> None:
        """Explicit plan: serve `slots[i]` for sample `indices[i]` until the next plan."""
        for plan in self._plans.values():
            plan.cancelled = True
        self._plans.clear()
        self._current = self._make_plan(("explicit", id(slots)), slots, indices)
        self._queue.put(self._current)

    def _rows(self, slots: torch.Tensor, indices: torch.Tensor, chosen: list[str],
              with_stats: bool, features: tuple[str, ...]) -> RowBatch:
        bufs, idx = self._planned(slots, indices).bufs, indices.cpu()
        arrays = [{k: bufs[a][k].index_select(0, idx) for k in self.step_arrays(a)}
                  for a in chosen]
        batch = mentor_rows(arrays, [self.logits_modes[a] for a in chosen], self.num_classes,
                            self.device, with_stats)
        # the epoch buffers hold row i of sample i (`_planned` checked the plan)
        tables = {name: [bufs[a][name] for a in self.mentors] for name in features}
        return batch._replace(features=feature_rows(tables, idx, self.device))

    def _schedule(self, key: Any, epoch: int, seed: int, idx: torch.Tensor) -> _Plan:
        slots, _ = self.epoch_views(epoch, idx, seed)
        plan = self._make_plan(key, slots, idx)
        self._plans[key] = plan
        self._queue.put(plan)
        return plan

    def _make_plan(self, key: Any, slots: torch.Tensor, indices: torch.Tensor) -> _Plan:
        full = torch.full((self.num_samples,), -1, dtype=torch.int64)
        full[torch.as_tensor(indices, dtype=torch.int64).cpu()] = \
            torch.as_tensor(slots, dtype=torch.int64).cpu()
        arrays = {}
        for alias in self.mentors:
            arrays[alias] = {}
            for name in [*self.step_arrays(alias), *self.features]:
                arr = self._group()[f"mentors/{alias}/{name}"]
                arrays[alias][name] = (tuple(arr.shape[2:]), np.dtype(arr.dtype))
        plan = _Plan(key, full, arrays, self.layout.grid[1], self.layout.samples_per_chunk,
                     pad_logits=not self.sparse)
        plan.block_order = need_order(indices, self.layout)
        return plan

    def _worker(self) -> None:
        while True:
            plan = self._queue.get()
            if plan is None:
                return
            try:
                self._fill(plan)
            except BaseException as err:  # noqa: BLE001 - surfaced to the reader
                plan.error = err
                for ev in plan.ready:
                    ev.set()

    def _fill(self, plan: _Plan) -> None:
        """Read the blocks in the order the epoch first needs them (a shard-block epoch's
        first steps wait for one block, not all); per block, only the slot chunks the plan
        uses."""
        lay = self.layout
        for b in plan.block_order:
            if plan.cancelled:
                break
            rng = lay.sample_range(b)
            slots = plan.slots[rng.start:rng.stop].numpy()
            want = np.nonzero(slots >= 0)[0]
            if len(want):
                for a in np.unique(slots[want] // lay.slots_per_chunk):
                    sr = lay.slot_range(int(a))
                    rows = want[(slots[want] >= sr.start) & (slots[want] < sr.stop)]
                    region = (slice(sr.start, sr.stop), slice(rng.start, rng.stop))
                    for alias, named in plan.rows.items():
                        for name, buf in named.items():
                            block = self.read_checked(alias, name, *region)
                            buf[rng.start + rows] = block[slots[rows] - sr.start, rows]
            plan.ready[b].set()

    def _planned(self, slots: torch.Tensor, indices: torch.Tensor) -> _Plan:
        """The current plan once the sample blocks of `indices` are read (these (slot,
        index) pairs must be the planned ones); a reader failure is raised here."""
        plan = self._current
        if plan is None:
            raise RuntimeError("stream mode: call start_epoch(epoch, seed) (or plan_epoch) "
                               "before gather")
        idx = indices.cpu()
        if not torch.equal(plan.slots[idx], slots.cpu()):
            raise ValueError("stream mode serves only the planned slots: these (slot, index) "
                             "pairs are not in the current epoch plan; call start_epoch with "
                             "the epoch/seed used by epoch_views, or use mode='memory'")
        for b in torch.unique(idx // plan.block).tolist():
            plan.ready[b].wait()
        if isinstance(plan.error, CacheMismatchError | CacheReadError):
            raise type(plan.error)(str(plan.error)) from plan.error
        if plan.error is not None:
            raise RuntimeError(f"stream reader failed on {self.path}: {plan.error}"
                               ) from plan.error
        return plan

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)


__all__ = ["StreamRows", "need_order"]

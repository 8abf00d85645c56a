"""`LogitCache`: serve cached mentor logits to a training step.

- `memory` mode decompresses the chosen mentors once into one tensor [M, S*N, C] (pinned
  CPU memory, or GPU memory when `device` is CUDA and it fits) and gathers rows with one
  `index_select` on that device.
- `stream` mode never holds the whole cache: an epoch uses exactly one slot per sample
  (`epoch_views`), so its working set is [M, N, C]. `start_epoch(e, seed)` plans epoch e
  (and prefetches e + 1) and a background thread reads the store in chunk order, picking
  each sample's planned row into an epoch buffer; `gather` waits only for the sample
  blocks it needs. Both modes return identical tensors.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from .layout import (
    CacheMismatchError,
    check_compatible,
    epoch_seed,
    layout_from_attrs,
    read_root_attrs,
)

READ_BYTES = 64 << 20  # raw bytes per zarr read call (zarr decodes its chunks in parallel)


def list_mentors(path: str | Path) -> dict[str, dict[str, Any]]:
    """alias -> mentor attributes, sorted by alias (only initialized mentor groups)."""
    mdir = Path(path) / "mentors"
    out = {}
    if mdir.is_dir():
        store = LocalStore(Path(path))
        for d in sorted(p for p in mdir.iterdir() if (p / "zarr.json").exists()):
            attrs = zarr.open_group(store, path=f"mentors/{d.name}", mode="r").attrs.asdict()
            if "alias" in attrs:
                out[d.name] = attrs
    return out


class _Plan:
    """One epoch's rows: slot per sample (-1: not needed) and the buffer being filled."""

    def __init__(self, key: Any, slots: torch.Tensor, num_mentors: int, num_classes: int,
                 dtype: torch.dtype, num_blocks: int, block: int) -> None:
        self.key = key
        self.slots = slots  # int64 [N], -1 where the sample is not in the plan
        self.buf = torch.zeros((num_mentors, len(slots), num_classes), dtype=dtype)
        self.ready = [threading.Event() for _ in range(num_blocks)]
        self.block = block
        self.error: BaseException | None = None
        self.cancelled = False  # dropped before the reader got to it: skip the IO


class LogitCache:
    """Read a logit cache built by `ckd cache-logits` (see docs/CACHE_FORMAT.md)."""

    def __init__(self, path: str | Path, mode: str = "memory", device: str | torch.device = "cpu",
                 mentors: Sequence[str] | None = None, progress: bool = False) -> None:
        if mode not in ("memory", "stream"):
            raise ValueError(f"mode must be 'memory' or 'stream', got {mode!r}")
        self.path, self.mode = Path(path), mode
        self.device = torch.device(device)
        self.meta = read_root_attrs(str(path))
        self.layout = layout_from_attrs(self.meta)
        self.num_classes = int(self.meta["num_classes"])
        self.num_samples = int(self.meta["num_samples"])
        self.num_slots = int(self.meta["views"]["num_slots"])
        self.keyed = self.meta["views"]["mode"] == "keyed"
        found = list_mentors(path)
        chosen = list(mentors) if mentors is not None else sorted(found)
        missing = [m for m in chosen if m not in found]
        if missing:
            raise KeyError(f"mentors {missing} not in {path}; it holds {sorted(found)}. Add them "
                           f"with `ckd cache-logits --out {path} --mentors {','.join(missing)}`")
        if not chosen:
            raise ValueError(f"{path} holds no mentors: run `ckd cache-logits --out {path} ...`")
        incomplete = [m for m in chosen if not found[m].get("complete")]
        if incomplete:
            raise RuntimeError(f"mentors {incomplete} in {path} are incomplete (interrupted "
                               "build): rerun the same `ckd cache-logits` command to finish")
        self.mentors = chosen
        self.mentor_meta = {m: found[m] for m in chosen}
        root = zarr.open_group(LocalStore(self.path), mode="r")
        self._arrays = [root[f"mentors/{m}/logits"] for m in chosen]
        self.labels = torch.from_numpy(root["labels"][:])
        self._vid_table = torch.from_numpy(root["view_ids"][:]).to(torch.int64) \
            if self.keyed else None
        self.dtype = torch.float16 if self.layout.dtype == "float16" else torch.float32
        self._progress = progress
        if mode == "memory":
            self._buf = self._load_all()
        else:
            self._plans: dict[Any, _Plan] = {}
            self._current: _Plan | None = None
            self._queue: queue.Queue[_Plan | None] = queue.Queue()
            self._thread = threading.Thread(target=self._worker, daemon=True,
                                            name="ckd-cache-stream")
            self._thread.start()

    # ---------------------------------------------------------------- common
    def __repr__(self) -> str:
        return (f"LogitCache({str(self.path)!r}, mode={self.mode!r}, mentors={self.mentors}, "
                f"slots={self.num_slots}, samples={self.num_samples}, "
                f"classes={self.num_classes})")

    def check_compatible(self, dataset_name: str | None = None, fingerprint: str | None = None,
                         num_classes: int | None = None) -> None:
        """Raise CacheMismatchError naming every mismatch (and the view recipe of this
        ckd) when the training data is not the data the cache was built from."""
        from ckd.data.views import RECIPE

        check_compatible(self.meta, dataset_name=dataset_name, fingerprint=fingerprint,
                         num_classes=num_classes, recipe=RECIPE, path=str(self.path))

    def epoch_views(self, epoch: int, indices: torch.Tensor, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, view_ids) for these samples in `epoch`: which cached row to gather and
        which view to apply to the student image. The single source of truth."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self.keyed:
            slot = int(epoch) % self.num_slots
            if self._vid_table.device != indices.device:  # move once, not every step
                self._vid_table = self._vid_table.to(indices.device)
            vids = self._vid_table[slot][indices]
            return torch.full_like(indices, slot), vids
        from ckd.data.views import view_ids

        vids = view_ids(epoch_seed(seed, epoch), indices)
        return vids, vids

    def gather(self, slots: torch.Tensor, indices: torch.Tensor,
               mentors: Sequence[str] | None = None) -> torch.Tensor:
        """Logits [M, B, C] (store dtype) of sample `indices[b]` in slot `slots[b]`."""
        slots = torch.as_tensor(slots, dtype=torch.int64)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if slots.shape != indices.shape or slots.ndim != 1:
            raise ValueError(f"slots {tuple(slots.shape)} and indices {tuple(indices.shape)} "
                             "must be 1-D of the same length")
        sel = None if mentors is None else torch.tensor([self._mentor_pos(m) for m in mentors])
        if self.mode == "memory":
            buf = self._buf
            flat = (slots.to(buf.device) * self.num_samples + indices.to(buf.device))
            out = buf.index_select(1, flat) if sel is None else \
                buf.index_select(0, sel.to(buf.device)).index_select(1, flat)
        else:
            out = self._stream_gather(slots, indices, sel)
        return out.to(self.device, non_blocking=True)

    def _mentor_pos(self, m: str) -> int:
        if m not in self.mentors:
            raise KeyError(f"mentor {m!r} not loaded; loaded: {self.mentors}")
        return self.mentors.index(m)

    # ---------------------------------------------------------------- memory mode
    def _load_all(self) -> torch.Tensor:
        m, s, n, c = len(self.mentors), self.num_slots, self.num_samples, self.num_classes
        nbytes = m * s * n * c * (2 if self.dtype == torch.float16 else 4)
        on_gpu = self.device.type == "cuda" and \
            torch.cuda.mem_get_info(self.device)[0] > nbytes * 1.2 + (1 << 30)
        pin = self.device.type == "cuda" and not on_gpu
        # Filled block by block in place (straight into GPU memory when it fits).
        buf = torch.empty((m, s * n, c), dtype=self.dtype, pin_memory=pin,
                          device=self.device if on_gpu else "cpu")
        view = buf.view(m, s, n, c)
        step = max(self.layout.samples_per_chunk,
                   READ_BYTES // max(1, s * c * buf.element_size())
                   // self.layout.samples_per_chunk * self.layout.samples_per_chunk)
        from tqdm import tqdm

        with tqdm(total=m * n, desc="load logit cache", unit="sample", unit_scale=True,
                  disable=not self._progress) as bar:
            for j, arr in enumerate(self._arrays):
                for n0 in range(0, n, step):
                    n1 = min(n, n0 + step)
                    view[j, :, n0:n1] = torch.from_numpy(arr[:, n0:n1, :])
                    bar.update(n1 - n0)
        return buf

    # ---------------------------------------------------------------- stream mode
    def start_epoch(self, epoch: int, seed: int, indices: torch.Tensor | None = None) -> None:
        """Make `epoch` current (planning it unless prefetched) and prefetch `epoch + 1`.
        A no-op in memory mode. `indices`: the samples this rank will use (default all)."""
        if self.mode == "memory":
            return
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
        if self.mode == "memory":
            return
        for plan in self._plans.values():
            plan.cancelled = True
        self._plans.clear()
        self._current = self._make_plan(("explicit", id(slots)), slots, indices)
        self._queue.put(self._current)

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
        return _Plan(key, full, len(self.mentors), self.num_classes, self.dtype,
                     self.layout.grid[1], self.layout.samples_per_chunk)

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
        """Read blocks in chunk order; per block, only the slot chunks the plan uses."""
        lay = self.layout
        for b in range(lay.grid[1]):
            if plan.cancelled:
                break
            rng = lay.sample_range(b)
            slots = plan.slots[rng.start:rng.stop].numpy()
            want = np.nonzero(slots >= 0)[0]
            if len(want):
                for a in np.unique(slots[want] // lay.slots_per_chunk):
                    sr = lay.slot_range(int(a))
                    rows = want[(slots[want] >= sr.start) & (slots[want] < sr.stop)]
                    for j, arr in enumerate(self._arrays):
                        block = arr[sr.start:sr.stop, rng.start:rng.stop, :]
                        plan.buf[j, rng.start + rows] = torch.from_numpy(
                            block[slots[rows] - sr.start, rows])
            plan.ready[b].set()

    def _stream_gather(self, slots: torch.Tensor, indices: torch.Tensor,
                       sel: torch.Tensor | None) -> torch.Tensor:
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
        if plan.error is not None:
            raise RuntimeError(f"stream reader failed on {self.path}") from plan.error
        out = plan.buf.index_select(1, idx)
        return out if sel is None else out.index_select(0, sel)

    def close(self) -> None:
        if self.mode == "stream" and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    def __enter__(self) -> LogitCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LogitCache", "CacheMismatchError", "list_mentors"]

"""`LogitCache`: serve cached mentor logits to a training step.

- `memory` mode decompresses the chosen mentors once into one tensor [M, S*N, C] (pinned
  CPU memory, or GPU memory when `device` is CUDA and it fits) and gathers rows with one
  `index_select` on that device.
- `stream` mode never holds the whole cache: an epoch uses exactly one slot per sample
  (`epoch_views`), so its working set is one row per sample and mentor of each array a
  step reads ([N, C] logits, or a sparse mentor's [N, K] ids/values, plus [N, *shape] per
  feature read). `start_epoch(e,
  seed)` plans epoch e (and prefetches e + 1) and a background thread reads the store in
  chunk order, picking each sample's planned row into an epoch buffer; `gather` waits only
  for the sample blocks it needs. Both modes return identical tensors (or identical
  `SparseMentors` for a cache with sparse mentors, docs/SPARSE.md).

Opening checks the store before serving anything: format version, the digests recorded in
the root attributes (labels, view ids, each mentor's metadata and unit markers), and that
every chunk file of every unit exists (zarr would read a missing one as zeros). Every unit
read is then checked against its crc32c in the marker. Any failure names the file and the
command that repairs it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ckd.row_align import padded_width

from .integrity import (
    array_digest,
    check_unit,
    chunk_key,
    marker_columns,
    mentor_digest,
    mentor_specs,
    unit_status,
)
from .layout import (
    CORRECT,
    MARKER,
    RRC_RECIPE_NAME,
    CacheIncompleteError,
    CacheMismatchError,
    CacheReadError,
    check_compatible,
    epoch_seed,
    layout_from_attrs,
    read_error,
    read_json_attrs,
    read_root_attrs,
    repair_hint,
)
from .location import CacheLocation, CacheRef, cache_location, zarr_store

READ_BYTES = 64 << 20  # raw bytes per zarr read call (zarr decodes its chunks in parallel)


def list_mentors(path: CacheRef) -> dict[str, dict[str, Any]]:
    """alias -> mentor attributes, sorted by alias (only initialized mentor groups)."""
    loc = cache_location(path)
    out = {}
    for name in loc.folders("mentors"):
        try:
            attrs = read_json_attrs(loc, f"mentors/{name}/zarr.json", missing="")
        except FileNotFoundError:
            continue
        if "alias" in attrs:
            out[name] = attrs
    return out


def read_array(store: CacheRef, root: zarr.Group, name: str, region: Any = slice(None),
               coords: tuple[int, ...] | None = None) -> np.ndarray:
    """root[name][region] with any open/decode/checksum failure named by file: the chunk at
    `coords` when given, else the first chunk of the array that fails to read."""
    try:
        return np.asarray(root[name][region])
    except (CacheReadError, CacheMismatchError):
        raise
    except Exception as err:  # noqa: BLE001 - zarr/codec/crc32c/JSON failures
        loc = cache_location(store)
        raise read_error(loc, _bad_file(loc, root, name, coords), err) from err


def _bad_file(loc: CacheLocation, root: zarr.Group, name: str,
              coords: tuple[int, ...] | None) -> str:
    """The file of chunk `coords` of `name`, else of its first chunk that fails to read, or
    its metadata (error path only)."""
    import itertools

    try:
        arr = root[name]
    except Exception:  # noqa: BLE001 - the array's own metadata is the problem
        return loc.file(f"{name}/zarr.json")
    if coords is not None:
        return loc.file(chunk_key(arr, coords))
    grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks, strict=True)]
    for at in itertools.product(*grid):
        try:
            arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(at, arr.chunks, strict=True))]
        except Exception:  # noqa: BLE001 - found it
            return loc.file(chunk_key(arr, at))
    return loc.file(name)


def open_root(store: CacheRef) -> zarr.Group:
    loc = cache_location(store)
    try:
        return zarr.open_group(zarr_store(loc, read_only=True), mode="r")
    except Exception as err:  # noqa: BLE001 - invalid metadata
        raise read_error(loc, loc.file("zarr.json"), err) from err


def check_store(path: CacheRef, meta: dict[str, Any], root: zarr.Group,
                mentors: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """Digests and completeness of the store for `mentors` (a CacheReadError or
    CacheIncompleteError naming the file and the repair); returns each mentor's marker."""
    path = cache_location(path)
    digests = meta.get("digests") or {}
    for name in ("labels", "view_ids"):
        if name not in digests:
            continue
        vals = read_array(path, root, name)
        if array_digest(vals) != digests[name]:
            raise CacheReadError(f"{path.file(name)}: its values do not match the digest recorded "
                                 f"when the store was built: {repair_hint(path)}")
    lay = layout_from_attrs(meta)
    markers = {}
    for m, attrs in mentors.items():
        marker = read_array(path, root, f"mentors/{m}/{MARKER}")
        undone, holes = unit_status(path, m, lay, marker, mentor_specs(attrs))
        if undone or holes:
            files = [f for fs in holes.values() for f in fs]
            what = (f"{len(holes)} unit(s) with missing chunk files (e.g. {files[0]})" if holes
                    else f"{len(undone)} unit(s) not computed (e.g. slot chunk {undone[0][0]}, "
                         f"sample block {undone[0][1]})")
            raise CacheIncompleteError(
                f"mentor {m!r} in {path} has holes: {what}. Rerun the `ckd cache-logits --out "
                f"{path} --mentors {m}={attrs.get('checkpoint')} ...` command that built it: "
                "it rebuilds exactly the missing chunks")
        want = (digests.get("mentors") or {}).get(m)
        if mentor_digest(path, m, marker) != want:
            raise CacheReadError(
                f"mentor {m!r} in {path}: its metadata (attributes, array metadata or unit "
                "markers) does not match the digest recorded when it was built (edited or "
                f"damaged): run `ckd cache verify {path}`, then delete {path.file('mentors/' + m)} "
                f"and rerun the `ckd cache-logits --out {path} ...` command to recompute it")
        correct = read_array(path, root, f"mentors/{m}/{CORRECT}")  # tiny: check it all
        columns = marker_columns(mentor_specs(attrs))
        for a, b in lay.units():
            sr = lay.slot_range(a)
            check_unit(path, m, lay, a, b, CORRECT, correct[sr.start:sr.stop, b:b + 1], marker,
                       columns, suffix_dims=-1)
        markers[m] = marker
    return markers


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


class LogitCache:
    """Read a logit cache built by `ckd cache-logits` (see docs/CACHE_FORMAT.md)."""

    def __init__(self, path: str | Path, mode: str = "memory", device: str | torch.device = "cpu",
                 mentors: Sequence[str] | None = None, progress: bool = False,
                 features: Sequence[str] = ()) -> None:
        if mode not in ("memory", "stream"):
            raise ValueError(f"mode must be 'memory' or 'stream', got {mode!r}")
        self.path, self.mode = cache_location(path), mode
        self.device = torch.device(device)
        self.meta = read_root_attrs(str(path))
        self.layout = layout_from_attrs(self.meta)
        self.num_classes = int(self.meta["num_classes"])
        self.num_samples = int(self.meta["num_samples"])
        self.num_slots = int(self.meta["views"]["num_slots"])
        self.keyed = self.meta["views"]["mode"] == "keyed"
        self.rrc = self.meta["views"]["recipe"].get("name") == RRC_RECIPE_NAME
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
            raise CacheIncompleteError(
                f"mentors {incomplete} in {path} are incomplete (interrupted build): rerun "
                "the same `ckd cache-logits` command to finish")
        self.mentors = chosen
        self.mentor_meta = {m: found[m] for m in chosen}
        self._root = root = open_root(self.path)
        self._root_pid = os.getpid()  # a forked child reopens the store (_group)
        self._markers = check_store(self.path, self.meta, root, self.mentor_meta)
        self._columns = {m: marker_columns(mentor_specs(self.mentor_meta[m])) for m in chosen}
        self.stat_fields = tuple(self.mentor_meta[chosen[0]].get("stat_fields", ()))
        self.labels = torch.from_numpy(read_array(self.path, root, "labels"))
        self._vid_table = torch.from_numpy(read_array(self.path, root, "view_ids")).to(
            torch.int64) if self.keyed and not self.rrc else None
        self.dtype = torch.float16 if self.layout.dtype == "float16" else torch.float32
        self._progress = progress
        self.features = tuple(features)
        self.feature_shapes = self._check_features(self.features)
        # storage mode per mentor (docs/SPARSE.md); any sparse one: gather -> SparseMentors
        self.logits_modes = {m: self.mentor_meta[m].get("logits_mode", "dense") for m in chosen}
        self.sparse = any(v != "dense" for v in self.logits_modes.values())
        if self.sparse and self.features:
            raise ValueError(f"{path} holds sparse mentor logits ({self.logits_modes}): they "
                             "are read without mentor features; cache the feature mentors "
                             "with `ckd cache-logits --logits dense`")
        if mode == "memory" and self.sparse:
            self._sparse_bufs = self._load_sparse()
        elif mode == "memory":
            self._buf, self._stats = self._load_all()
            self._feat = self._load_features()
        else:
            self._plans: dict[Any, _Plan] = {}
            self._current: _Plan | None = None
            self._queue: queue.Queue[_Plan | None] = queue.Queue()
            self._thread = threading.Thread(target=self._worker, daemon=True,
                                            name="ckd-cache-stream")
            self._thread.start()

    # ---------------------------------------------------------------- common
    def _group(self) -> zarr.Group:
        """The open store of this process: an object store's client is never used across
        a fork (a forked worker opens its own)."""
        if self._root_pid != os.getpid():
            self._root, self._root_pid = open_root(self.path), os.getpid()
        return self._root

    def __repr__(self) -> str:
        return (f"LogitCache({str(self.path)!r}, mode={self.mode!r}, mentors={self.mentors}, "
                f"slots={self.num_slots}, samples={self.num_samples}, "
                f"classes={self.num_classes})")

    def check_compatible(self, dataset_name: str | None = None, fingerprint: str | None = None,
                         num_classes: int | None = None) -> None:
        """Raise CacheMismatchError naming every mismatch (and the view recipe of this
        ckd) when the training data is not the data the cache was built from."""
        from ckd.data.views import RECIPE

        if self.rrc:  # an image folder's random-resized crops
            from ckd.data.rrc import RECIPE
        check_compatible(self.meta, dataset_name=dataset_name, fingerprint=fingerprint,
                         num_classes=num_classes, recipe=RECIPE, path=str(self.path))

    def epoch_views(self, epoch: int, indices: torch.Tensor, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, view_ids) for these samples in `epoch`: which cached row to gather and
        which view to apply to the student image. The single source of truth. For
        random-resized-crop caches both are the slot: sample i's view is `boxes[slot, i]`."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self.rrc:  # random-resized crops: slot hash(seed, epoch, i) mod K per sample
            from ckd.data.rrc import epoch_slots

            slots = epoch_slots(seed, epoch, indices, self.num_slots)
            return slots, slots  # the view is (slot, sample): its box is in `boxes`
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
               mentors: Sequence[str] | None = None, with_stats: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [M, B, C] (store dtype) of sample `indices[b]` in slot `slots[b]`; with
        `with_stats`, also the mentors' row statistics [M, B, K] (fp32, `stat_fields`).
        The logits are a view of a [M, B, padded_width(C)] buffer: every row starts on a
        16-byte boundary (`ckd.row_align`), so the loss kernels load them 128 bits at a time."""
        slots = torch.as_tensor(slots, dtype=torch.int64)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if slots.shape != indices.shape or slots.ndim != 1:
            raise ValueError(f"slots {tuple(slots.shape)} and indices {tuple(indices.shape)} "
                             "must be 1-D of the same length")
        sel = None if mentors is None else torch.tensor([self._mentor_pos(m) for m in mentors])
        if self.sparse:
            return self._sparse_gather(slots, indices, mentors, with_stats)
        if self.mode == "memory":
            flat = (slots.to(self._buf.device) * self.num_samples
                    + indices.to(self._buf.device))
            out, stats = (self._pick(t, flat, sel) for t in (self._buf, self._stats))
        else:
            out, stats = self._stream_gather(slots, indices, sel)
        out = out.to(self.device, non_blocking=True)[..., :self.num_classes]
        return (out, stats.to(self.device, non_blocking=True)) if with_stats else out

    def gather_with_features(self, slots: torch.Tensor, indices: torch.Tensor,
                             features: Sequence[str], with_stats: bool = False) -> tuple:
        """(logits [M, B, C] as `gather`, {feature: one fp32 [B, *shape] tensor per mentor})
        of the same rows: what online mentors' `forward(x, is_feat=True)` gives; with
        `with_stats`, (logits, stats, features)."""
        missing = [f for f in features if f not in self.features]
        if missing:
            raise KeyError(f"features {missing} were not loaded: open the cache with "
                           f"features={list(features)}")
        # stream mode: waits for these rows' blocks
        logits = self.gather(slots, indices, with_stats=with_stats)
        if self.mode == "memory":
            rows = (torch.as_tensor(slots, dtype=torch.int64) * self.num_samples
                    + torch.as_tensor(indices, dtype=torch.int64))
            source = self._feat
        else:  # the epoch buffers hold row i of sample i (gather checked the plan)
            rows = torch.as_tensor(indices, dtype=torch.int64).cpu()
            bufs = self._current.bufs
            source = {name: [bufs[a][name] for a in self.mentors] for name in features}
        out = {}
        for name in features:
            out[name] = [t.index_select(0, rows.to(t.device)).to(self.device).float()
                         for t in source[name]]
        return (*logits, out) if with_stats else (logits, out)

    def _check_features(self, features: Sequence[str]) -> dict[str, list[tuple[int, ...]]]:
        """Per-row shape of each requested feature, per mentor; a mentor cached without
        one is refused with the command that adds it."""
        if not features:
            return {}
        from .layout import FEATURES

        bad = [f for f in features if f not in FEATURES]
        if bad:
            raise ValueError(f"unknown features {bad}; cacheable: {', '.join(FEATURES)}")
        shapes: dict[str, list[tuple[int, ...]]] = {f: [] for f in features}
        for m in self.mentors:
            have = self.mentor_meta[m].get("features") or {}
            lack = [f for f in features if f not in have]
            if lack and self.rrc:  # `cache-logits --features` refuses image folders
                raise CacheMismatchError(
                    f"this method reads mentor features ({','.join(lack)}), which a cache of "
                    f"an image folder ({self.path}) cannot hold yet: train with a logit "
                    "method here (`ckd methods` lists them)")
            if lack:
                raise CacheMismatchError(
                    f"mentor {m!r} in {self.path} was cached without the {','.join(lack)} "
                    f"feature(s) this method reads: add them with `ckd cache-logits --out "
                    f"{self.path} --mentors {m}=CHECKPOINT --features "
                    f"{','.join(features)} ...` (the same options as the cache was built "
                    "with; only the missing features are computed)")
            for f in features:
                shapes[f].append(tuple(int(d) for d in have[f]))
        return shapes

    def _load_features(self) -> dict[str, list[torch.Tensor]]:
        """Every requested feature array, one [S * N, *shape] tensor per mentor (store
        dtype, on the device when it fits), each unit checked against its checksum."""
        out: dict[str, list[torch.Tensor]] = {}
        for name in self.features:
            out[name] = []
            for alias in self.mentors:
                vals = self._read_checked(alias, name, slice(None), slice(None))
                t = torch.from_numpy(vals).reshape(-1, *vals.shape[2:])
                out[name].append(t.to(self.device) if self.device.type == "cuda" else t)
        return out

    @staticmethod
    def _pick(buf: torch.Tensor, rows: torch.Tensor, sel: torch.Tensor | None
              ) -> torch.Tensor:
        return buf.index_select(1, rows) if sel is None else \
            buf.index_select(0, sel.to(buf.device)).index_select(1, rows)

    def _mentor_pos(self, m: str) -> int:
        if m not in self.mentors:
            raise KeyError(f"mentor {m!r} not loaded; loaded: {self.mentors}")
        return self.mentors.index(m)

    # ---------------------------------------------------------------- memory mode
    def _load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, s, n, c = len(self.mentors), self.num_slots, self.num_samples, self.num_classes
        k = len(self.stat_fields)
        cp = padded_width(c, self.dtype)  # rows padded to 16 bytes (ckd.row_align)
        nbytes = m * s * n * (cp * (2 if self.dtype == torch.float16 else 4) + 4 * k)
        on_gpu = self.device.type == "cuda" and \
            torch.cuda.mem_get_info(self.device)[0] > nbytes * 1.2 + (1 << 30)
        pin = self.device.type == "cuda" and not on_gpu
        dev = self.device if on_gpu else "cpu"
        # Filled block by block in place (straight into GPU memory when it fits).
        buf = torch.empty((m, s * n, cp), dtype=self.dtype, pin_memory=pin, device=dev)
        buf[..., c:] = 0  # the pad: deterministic bytes (the kernels mask it)
        stats = torch.empty((m, s * n, k), dtype=torch.float32, pin_memory=pin, device=dev)
        view, sview = buf.view(m, s, n, cp)[..., :c], stats.view(m, s, n, k)
        lay = self.layout
        step = max(lay.samples_per_chunk,
                   READ_BYTES // max(1, s * c * buf.element_size())
                   // lay.samples_per_chunk * lay.samples_per_chunk)
        from tqdm import tqdm

        with tqdm(total=m * n, desc="load logit cache", unit="sample", unit_scale=True,
                  disable=not self._progress) as bar:
            for j, alias in enumerate(self.mentors):
                for n0 in range(0, n, step):
                    n1 = min(n, n0 + step)
                    vals = self._read_checked(alias, "logits", slice(None), slice(n0, n1))
                    view[j, :, n0:n1] = torch.from_numpy(vals)
                    st = self._read_checked(alias, "stats", slice(None), slice(n0, n1))
                    sview[j, :, n0:n1] = torch.from_numpy(st)
                    bar.update(n1 - n0)
        return buf, stats

    # ---------------------------------------------------------------- sparse mentors
    def _load_sparse(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every array a step reads of every mentor (`_step_arrays`: its logits, dense or
        sparse, and its stats), [S*N, ...] per array (slot-major rows, as the dense buffer);
        checked unit by unit like the dense path."""
        s, n = self.num_slots, self.num_samples
        bufs: dict[str, dict[str, torch.Tensor]] = {}
        for alias in self.mentors:
            bufs[alias] = {}
            for name in self._step_arrays(alias):
                vals = np.ascontiguousarray(
                    self._read_checked(alias, name, slice(None), slice(None)))
                bufs[alias][name] = torch.from_numpy(vals).reshape(s * n, *vals.shape[2:])
        return bufs

    def _step_arrays(self, alias: str) -> list[str]:
        """The arrays a training step reads of this mentor: `logits` (or its sparse arrays,
        ckd/cache/sparse.py) and `stats`; not its view boxes or features."""
        attrs = {**self.mentor_meta[alias], "features": None, "boxes": False}
        return [sp.name for sp in mentor_specs(attrs)]

    def _sparse_gather(self, slots: torch.Tensor, indices: torch.Tensor,
                       mentors: Sequence[str] | None, with_stats: bool) -> Any:
        """SparseMentors of these rows (dense mentors of a mixed set as exact K = C rows),
        from the memory buffers or the current stream plan."""
        from ckd.kernels.sparse_mentors import stack

        from .sparse import rows_to_sparse

        if self.mode == "memory":
            bufs, rows = self._sparse_bufs, slots * self.num_samples + indices
        else:
            bufs, rows = self._planned(slots, indices).bufs, indices.cpu()
        parts, stats = [], []
        for alias in (list(mentors) if mentors is not None else self.mentors):
            self._mentor_pos(alias)
            arrays = {k: v.index_select(0, rows) for k, v in bufs[alias].items()}
            st = arrays.pop("stats")
            parts.append(rows_to_sparse(self.logits_modes[alias], self.num_classes, arrays, st))
            stats.append(st)
        out = stack(parts).to(self.device)
        return (out, torch.stack(stats).to(self.device)) if with_stats else out

    def _read_checked(self, alias: str, name: str, slots: slice, samples: slice
                      ) -> np.ndarray:
        """mentors/alias/name[slots, samples] (whole units), each unit checked against
        its crc32c in the marker; a failure names the unit's chunk file."""
        lay = self.layout
        path = f"mentors/{alias}/{name}"
        s0, s1, _ = slots.indices(lay.num_slots)
        n0, n1, _ = samples.indices(lay.num_samples)
        a0, b0 = s0 // lay.slots_per_chunk, n0 // lay.samples_per_chunk
        vals = read_array(self.path, self._group(), path, (slots, samples))
        for a in range(a0, -(-s1 // lay.slots_per_chunk)):
            for b in range(b0, -(-n1 // lay.samples_per_chunk)):
                sr, sm = lay.slot_range(a), lay.sample_range(b)
                unit = vals[sr.start - s0:sr.stop - s0, sm.start - n0:sm.stop - n0]
                check_unit(self.path, alias, lay, a, b, name, unit, self._markers[alias],
                           self._columns[alias], unit.ndim - 2)
        return vals

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
        arrays = {}
        for alias in self.mentors:
            arrays[alias] = {}
            for name in [*self._step_arrays(alias), *self.features]:
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
                            block = self._read_checked(alias, name, *region)
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

    def _stream_gather(self, slots: torch.Tensor, indices: torch.Tensor,
                       sel: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        bufs, idx = self._planned(slots, indices).bufs, indices.cpu()
        chosen = self.mentors if sel is None else [self.mentors[j] for j in sel.tolist()]
        return tuple(torch.stack([bufs[a][name].index_select(0, idx) for a in chosen])
                     for name in ("logits", "stats"))

    def close(self) -> None:
        if self.mode == "stream" and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    def __enter__(self) -> LogitCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LogitCache", "CacheMismatchError", "list_mentors", "check_store", "read_array"]

"""Open a logit cache built by `ckd cache-logits` (docs/CACHE_FORMAT.md): `CacheReader`,
what every row source (`rows.py`: memory, stream, blocks) shares.

Opening checks the store before serving anything: format version, the digests recorded in
the root attributes (labels, view ids, each mentor's metadata and unit markers), and that
every chunk file of every unit exists (zarr would read a missing one as zeros). Every unit
read is then checked against its crc32c in the marker (`read_checked`). Any failure names
the file and the command that repairs it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ckd.data.protocol import recipe_for

from .features import cached_feature_shapes
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
    CacheIncompleteError,
    CacheMismatchError,
    CacheReadError,
    check_compatible,
    layout_from_attrs,
    read_error,
    read_json_attrs,
    read_root_attrs,
    repair_hint,
)
from .location import CacheLocation, CacheRef, cache_location, zarr_store
from .rows import Logits, RowBatch, as_request


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



class CacheReader:
    """An opened, checked cache: its metadata, mentors, epoch rule and checked unit reads.
    The row sources (`MemoryRows`, `StreamRows`, `BlockRows`) are CacheReaders that add
    where rows come from (`_rows`); open one with `ckd.cache.open_cache`."""

    mode = ""  # the row source's name: memory, stream or blocks

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 mentors: Sequence[str] | None = None, features: Sequence[str] = ()) -> None:
        self.path = cache_location(path)
        self.device = torch.device(device)
        self.meta = read_root_attrs(str(path))
        self.layout = layout_from_attrs(self.meta)
        self.num_classes = int(self.meta["num_classes"])
        self.num_samples = int(self.meta["num_samples"])
        self.num_slots = int(self.meta["views"]["num_slots"])
        self.keyed = self.meta["views"]["mode"] == "keyed"
        self.recipe = recipe_for(self.meta["views"]["recipe"])  # owns the epoch rule
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
        self._step_arrays: dict[str, list[str]] = {}  # alias -> array names (step_arrays)
        self._root = root = open_root(self.path)
        self._root_pid = os.getpid()  # a forked child reopens the store (_group)
        self._markers = check_store(self.path, self.meta, root, self.mentor_meta)
        self._columns = {m: marker_columns(mentor_specs(self.mentor_meta[m])) for m in chosen}
        self.stat_fields = tuple(self.mentor_meta[chosen[0]].get("stat_fields", ()))
        self.labels = torch.from_numpy(read_array(self.path, root, "labels"))
        self._vid_table = torch.from_numpy(read_array(self.path, root, "view_ids")).to(
            torch.int64) if self.keyed and self.recipe.num_views is not None else None
        self.dtype = torch.float16 if self.layout.dtype == "float16" else torch.float32
        self.features = tuple(features)
        self.feature_shapes = cached_feature_shapes(self.mentor_meta, self.features,
                                                    self.path, self.recipe.num_views is None)
        # storage mode per mentor (docs/SPARSE.md); any sparse one: rows as SparseMentors
        self.logits_modes = {m: self.mentor_meta[m].get("logits_mode", "dense") for m in chosen}
        if self.sparse and self.features:
            raise ValueError(f"{path} holds sparse mentor logits ({self.logits_modes}): they "
                             "are read without mentor features; cache the feature mentors "
                             "with `ckd cache-logits --logits dense`")

    @property
    def sparse(self) -> bool:
        """Some mentor is stored sparse: rows come back as `SparseMentors`."""
        return any(v != "dense" for v in self.logits_modes.values())

    def _group(self) -> zarr.Group:
        """The open store of this process: an object store's client is never used across
        a fork (a forked worker opens its own)."""
        if self._root_pid != os.getpid():
            self._root, self._root_pid = open_root(self.path), os.getpid()
        return self._root

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, mentors={self.mentors}, "
                f"slots={self.num_slots}, samples={self.num_samples}, "
                f"classes={self.num_classes})")

    def check_compatible(self, dataset_name: str | None = None, fingerprint: str | None = None,
                         num_classes: int | None = None) -> None:
        """Raise CacheMismatchError naming every mismatch (and the view recipe of this
        ckd) when the training data is not the data the cache was built from."""
        check_compatible(self.meta, dataset_name=dataset_name, fingerprint=fingerprint,
                         num_classes=num_classes, recipe=self.recipe.record,
                         path=str(self.path))

    def epoch_views(self, epoch: int, indices: torch.Tensor, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, view_ids) for these samples in `epoch`: which cached row to gather and
        which view to apply to the student image, by the cache's view recipe
        (`ckd.data.protocol.ViewRecipe`). For continuous views (random-resized crops)
        both are the slot: sample i's view is `boxes[slot, i]`."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if not self.keyed:  # every view cached: the slot is the view
            vids = self.recipe.epoch_view_ids(seed, epoch, indices)
            return vids, vids
        slots = self.recipe.epoch_slots(seed, epoch, indices, self.num_slots)
        if self._vid_table is None:  # continuous views: (slot, sample), its box in `boxes`
            return slots, slots
        if self._vid_table.device != indices.device:  # move once, not every step
            self._vid_table = self._vid_table.to(indices.device)
        return slots, self._vid_table[slots, indices]

    def gather_rows(self, slots: torch.Tensor, indices: torch.Tensor,
                    mentors: Sequence[str] | None = None, *, with_stats: bool = False,
                    features: Sequence[str] = ()) -> RowBatch:
        """The rows of sample `indices[b]` in slot `slots[b]` (`RowBatch`): logits [M, B, C]
        (store dtype; a view of a [M, B, padded_width(C)] buffer, every row on a 16-byte
        boundary, `ckd.row_align`) or `SparseMentors`; with `with_stats` the mentors' row
        statistics [M, B, K] (fp32, `stat_fields`); each of `features` (loaded when
        opened) as one fp32 [B, *shape] tensor per mentor."""
        slots, indices = as_request(slots, indices)
        chosen = self.mentors if mentors is None else [self._known(m) for m in mentors]
        missing = [f for f in features if f not in self.features]
        if missing:
            raise KeyError(f"features {missing} were not loaded: open the cache with "
                           f"features={list(features)}")
        return self._rows(slots, indices, chosen, with_stats, tuple(features))

    def gather(self, slots: torch.Tensor, indices: torch.Tensor,
               mentors: Sequence[str] | None = None, with_stats: bool = False
               ) -> Logits | tuple[Logits, torch.Tensor]:
        """`gather_rows(...).logits`; with `with_stats`, (logits, stats)."""
        rows = self.gather_rows(slots, indices, mentors, with_stats=with_stats)
        return (rows.logits, rows.stats) if with_stats else rows.logits

    def gather_with_features(self, slots: torch.Tensor, indices: torch.Tensor,
                             features: Sequence[str], with_stats: bool = False) -> tuple:
        """(logits [M, B, C] as `gather`, {feature: one fp32 [B, *shape] tensor per mentor})
        of the same rows: what online mentors' `forward(x, is_feat=True)` gives; with
        `with_stats`, (logits, stats, features)."""
        rows = self.gather_rows(slots, indices, with_stats=with_stats, features=features)
        return tuple(rows) if with_stats else (rows.logits, rows.features)

    def _rows(self, slots: torch.Tensor, indices: torch.Tensor, chosen: list[str],
              with_stats: bool, features: tuple[str, ...]) -> RowBatch:
        """The source's rows of `chosen` mentors (the request already checked)."""
        raise NotImplementedError(f"{type(self).__name__} serves no rows: open the cache with "
                                  "`ckd.cache.open_cache`")

    def start_epoch(self, epoch: int, seed: int, indices: torch.Tensor | None = None) -> None:
        """Get ready for `epoch` (`indices`: the samples this rank uses, default all);
        nothing to do unless the source reads ahead."""

    def close(self) -> None:
        """Release what the source holds (threads, buffers)."""

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _known(self, m: str) -> str:
        if m not in self.mentors:
            raise KeyError(f"mentor {m!r} not loaded; loaded: {self.mentors}")
        return m

    def step_arrays(self, alias: str) -> list[str]:
        """The arrays a training step reads of this mentor: `logits` (or its sparse arrays,
        ckd/cache/sparse.py) and `stats`; not its view boxes or features."""
        if alias not in self._step_arrays:
            attrs = {**self.mentor_meta[alias], "features": None, "boxes": False}
            self._step_arrays[alias] = [sp.name for sp in mentor_specs(attrs)]
        return self._step_arrays[alias]

    def read_checked(self, alias: str, name: str, slots: slice, samples: slice
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


__all__ = ["CacheReader", "CacheMismatchError", "list_mentors", "check_store", "read_array",
           "open_root"]

"""Integrity of a cache store: the chunk files of a work unit, the unit checksum (the
completion marker's value) and the sha256 digests recorded in the root attributes.

Zarr reads a missing chunk file as its fill value, so completion is never inferred from
values: a unit is done when its marker is set *and* every chunk file of the unit exists,
and its values match the marker's crc32c."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import crc32c
import numpy as np
import zarr

from .layout import (
    BOXES,
    CORRECT,
    MARKER,
    MENTOR_ARRAYS,
    ArraySpec,
    CacheReadError,
    Layout,
    feature_spec,
    read_error,
    repair_hint,
)
from .location import CacheLocation, CacheRef, cache_location, zarr_store
from .pose_arrays import pose_specs
from .sparse import sparse_array_specs


def mentor_specs(mentor_attrs: Mapping[str, Any] | None = None) -> list[ArraySpec]:
    """The declared arrays a mentor holds (all of them unless its attrs list fewer), then
    its view boxes (image folders: `boxes` true), then its feature arrays (`features`:
    name -> per-row shape, when cached with --features). A sparse mentor (attrs
    `logits_mode` topk:K / sample:S) holds its sparse arrays instead of `logits`
    (ckd/cache/sparse.py)."""
    attrs = mentor_attrs or {}
    names = attrs.get("arrays")
    if attrs.get("kind") == "pose":  # rows of joint logits, PCK, view parameters
        return [s for s in pose_specs(attrs) if names is None or s.name in names]
    feats = attrs.get("features") or {}
    specs = list(MENTOR_ARRAYS)
    if attrs.get("logits_mode", "dense") != "dense":
        specs = [*sparse_array_specs(attrs["logits_mode"], int(attrs["num_classes"])),
                 *(s for s in MENTOR_ARRAYS if s.name != "logits")]
    return [*(s for s in specs if names is None or s.name in names),
            *([BOXES] if attrs.get("boxes") else []),
            *(feature_spec(n, shape) for n, shape in feats.items())]


def chunk_key(array: zarr.Array, coords: Sequence[int]) -> str:
    """Store key of one chunk of `array`, from the chunk key encoding in its own metadata
    (`mentors/r8/logits/c/0/3/0` for zarr v3's default encoding)."""
    return f"{array.path}/{array.metadata.encode_chunk_key(tuple(int(c) for c in coords))}"


def open_array(store: CacheRef, name: str) -> zarr.Array:
    """The array `name` of a cache store, read-only; damaged metadata names its file."""
    loc = cache_location(store)
    try:
        return zarr.open_array(zarr_store(loc, read_only=True), path=name, mode="r")
    except Exception as err:  # noqa: BLE001 - missing or invalid zarr.json
        raise read_error(loc, loc.file(f"{name}/zarr.json"), err) from err


def unit_keys(arrays: Mapping[str, zarr.Array], a: int, b: int) -> list[str]:
    """The key of every chunk unit (a, b) writes: chunk (a, b, 0, ...) of each of the
    mentor's arrays (they are all [S, N, ...], chunked whole past the first two axes)."""
    return [chunk_key(arr, (a, b, *[0] * (arr.ndim - 2))) for arr in arrays.values()]


def unit_status(store: CacheRef, alias: str, layout: Layout, marker: np.ndarray,
                specs: Sequence[ArraySpec]) -> tuple[list[tuple[int, int]],
                                                     dict[tuple[int, int], list[str]]]:
    """(undone units, {marked unit: its missing chunk files}) from the marker values and
    the keys in the store (one listing of the mentor's prefix)."""
    loc = cache_location(store)
    undone, holes = [], {}
    present, arrays = None, {}
    for a, b in layout.units():
        if (marker[a, b] < 0).any():
            undone.append((a, b))
            continue
        if present is None:  # every array's key encoding, the marker's last
            base = f"mentors/{alias}"
            arrays = {n: open_array(loc, f"{base}/{n}") for n in (*(s.name for s in specs),
                                                                  CORRECT, MARKER)}
            present = set(loc.keys(base))
        missing = [loc.file(k) for k in unit_keys(arrays, a, b) if k not in present]
        if missing:
            holes[(a, b)] = missing
    return undone, holes


def marker_columns(specs: Sequence[ArraySpec]) -> list[str]:
    """The marker's last axis: one crc32c per declared array of the mentor, then CORRECT."""
    return [*(s.name for s in specs), CORRECT]


def unit_crc(a: int, b: int, name: str, values: np.ndarray) -> int:
    """crc32c of one array's values in unit (a, b): the coordinates and array name first
    (a chunk moved to another unit or array fails), then its little-endian bytes."""
    crc = crc32c.crc32c(f"{a},{b},{name};".encode())
    v = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return int(crc32c.crc32c(v.view(np.uint8).reshape(-1), crc))


def unit_marker(a: int, b: int, named_values: Mapping[str, np.ndarray],
                columns: Sequence[str]) -> np.ndarray:
    """The marker chunk of unit (a, b): int64 [1, 1, len(columns)]."""
    return np.array([unit_crc(a, b, c, named_values[c]) for c in columns],
                    dtype=np.int64).reshape(1, 1, -1)


def check_unit(store: CacheRef, alias: str, layout: Layout, a: int, b: int, name: str,
               values: np.ndarray, marker: np.ndarray, columns: Sequence[str],
               suffix_dims: int = 1) -> None:
    """Raise CacheReadError when unit (a, b)'s values of array `name` do not match the
    crc32c recorded by its writer (a swapped, replaced or re-encoded chunk file)."""
    if unit_crc(a, b, name, values) != int(marker[a, b, columns.index(name)]):
        loc = cache_location(store)
        coords = (a, b) if name == CORRECT else (a, b, *[0] * suffix_dims)
        file = loc.file(chunk_key(open_array(loc, f"mentors/{alias}/{name}"), coords))
        raise CacheReadError(
            f"{file}: its values do not match the unit checksum recorded when it was written "
            f"(a chunk file swapped, replaced or edited): {repair_hint(loc, file)}")


def _canonical_json(loc: CacheLocation, key: str) -> bytes:
    try:
        data = loc.get(key)
        if data is None:
            raise FileNotFoundError("missing")
        meta = json.loads(data)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise read_error(loc, loc.file(key), err) from err
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def mentor_digest(store: CacheRef, alias: str, marker: np.ndarray) -> str:
    """sha256 of a mentor's metadata (its group and array zarr.json files, parsed and
    re-serialized canonically) and of its unit markers (which checksum every chunk)."""
    loc = cache_location(store)
    base = f"mentors/{alias}"
    h = hashlib.sha256()
    arrays = loc.folders(base)
    for rel in ["zarr.json", *(f"{n}/zarr.json" for n in arrays)]:
        h.update(rel.encode() + b"\0" + _canonical_json(loc, f"{base}/{rel}") + b"\0")
    h.update(np.ascontiguousarray(marker, dtype="<i8").tobytes())
    return h.hexdigest()


def array_digest(values: np.ndarray) -> str:
    """sha256 of an array's little-endian bytes, shape and dtype."""
    v = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    head = f"{v.dtype.str}{list(v.shape)}".encode()
    return hashlib.sha256(head + v.tobytes()).hexdigest()


def root_data_digests(labels: np.ndarray, view_ids: np.ndarray | None) -> dict[str, str]:
    out = {"labels": array_digest(labels)}
    if view_ids is not None:
        out["view_ids"] = array_digest(view_ids)
    return out

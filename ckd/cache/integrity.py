"""Integrity of a cache store: the chunk files of a work unit, the unit checksum (the
completion marker's value) and the sha256 digests recorded in the root attributes.

Zarr reads a missing chunk file as its fill value, so completion is never inferred from
values: a unit is done when its marker is set *and* every chunk file of the unit exists,
and its values match the marker's crc32c."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

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
from .location import ObjectPath, cache_path, list_files


def mentor_specs(mentor_attrs: Mapping[str, Any] | None = None) -> list[ArraySpec]:
    """The declared arrays a mentor holds (all of them unless its attrs list fewer), then
    its view boxes (image folders: `boxes` true), then its feature arrays (`features`:
    name -> per-row shape, when cached with --features). A sparse mentor (attrs
    `logits_mode` topk:K / sample:S) holds its sparse arrays instead of `logits`
    (ckd/cache/sparse.py)."""
    attrs = mentor_attrs or {}
    names = attrs.get("arrays")
    if attrs.get("kind") == "pose":  # rows of joint logits, PCK, view parameters
        from .pose_arrays import pose_specs

        return [s for s in pose_specs(attrs) if names is None or s.name in names]
    feats = attrs.get("features") or {}
    specs = list(MENTOR_ARRAYS)
    if attrs.get("logits_mode", "dense") != "dense":
        from .sparse import sparse_array_specs

        specs = [*sparse_array_specs(attrs["logits_mode"], int(attrs["num_classes"])),
                 *(s for s in MENTOR_ARRAYS if s.name != "logits")]
    return [*(s for s in specs if names is None or s.name in names),
            *([BOXES] if attrs.get("boxes") else []),
            *(feature_spec(n, shape) for n, shape in feats.items())]


def chunk_file(store: Path | ObjectPath, array_path: str, coords: Sequence[int]
               ) -> Path | ObjectPath:
    """File of one chunk (zarr v3 default chunk keys: <array>/c/i/j/k)."""
    return cache_path(store).joinpath(*array_path.split("/"), "c", *map(str, coords))


def unit_files(store: Path, alias: str, layout: Layout, a: int, b: int,
               specs: Iterable[ArraySpec]) -> list[Path]:
    """Every chunk file unit (a, b) writes, the marker last."""
    base = f"mentors/{alias}"
    files = [chunk_file(store, f"{base}/{s.name}", (a, b, *[0] * len(s.suffix(layout))))
             for s in specs]
    return [*files, chunk_file(store, f"{base}/{CORRECT}", (a, b)),
            chunk_file(store, f"{base}/{MARKER}", (a, b, 0))]


def unit_status(store: Path, alias: str, layout: Layout, marker: np.ndarray,
                specs: Sequence[ArraySpec]) -> tuple[list[tuple[int, int]],
                                                     dict[tuple[int, int], list[Path]]]:
    """(undone units, {marked unit: its missing chunk files}) from the marker values and
    the files in the store (one listing of the mentor's folder or prefix)."""
    undone, holes = [], {}
    present = None
    for a, b in layout.units():
        if (marker[a, b] < 0).any():
            undone.append((a, b))
            continue
        if present is None:
            mdir = cache_path(store) / "mentors" / alias
            present = {str(mdir / rel) for rel in list_files(mdir)}
        missing = [f for f in unit_files(store, alias, layout, a, b, specs)
                   if str(f) not in present]
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


def check_unit(store: Path, alias: str, layout: Layout, a: int, b: int, name: str,
               values: np.ndarray, marker: np.ndarray, columns: Sequence[str],
               suffix_dims: int = 1) -> None:
    """Raise CacheReadError when unit (a, b)'s values of array `name` do not match the
    crc32c recorded by its writer (a swapped, replaced or re-encoded chunk file)."""
    if unit_crc(a, b, name, values) != int(marker[a, b, columns.index(name)]):
        coords = (a, b) if name == CORRECT else (a, b, *[0] * suffix_dims)
        file = chunk_file(store, f"mentors/{alias}/{name}", coords)
        raise CacheReadError(
            f"{file}: its values do not match the unit checksum recorded when it was written "
            f"(a chunk file swapped, replaced or edited): {repair_hint(store, file)}")


def _canonical_json(file: Path, store: Path) -> bytes:
    try:
        meta = json.loads(file.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise read_error(store, file, err) from err
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def mentor_digest(store: Path, alias: str, marker: np.ndarray) -> str:
    """sha256 of a mentor's metadata (its group and array zarr.json files, parsed and
    re-serialized canonically) and of its unit markers (which checksum every chunk)."""
    mdir = cache_path(store) / "mentors" / alias
    h = hashlib.sha256()
    files = [mdir / "zarr.json", *sorted(p / "zarr.json" for p in mdir.iterdir() if p.is_dir())]
    for f in files:
        h.update(str(f.relative_to(mdir)).encode() + b"\0" + _canonical_json(f, store) + b"\0")
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

"""`ckd cache info` and `ckd cache verify`: what a cache holds, and whether it is intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from ckd.data.protocol import TrainingData
from ckd.kernels.sparse_mentors import bytes_per_row

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
    CacheReadError,
    Layout,
    UnitValues,
    layout_from_attrs,
    read_json_attrs,
    read_root_attrs,
    root_array_names,
)
from .location import cache_location
from .mentors import recorded_precision
from .reader import list_mentors, open_root, read_array
from .recompute import VerifyReport, recompute_rows
from .sparse import sparse_problems


def info(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(root attributes, one row per mentor: alias, arch, test_acc, train_acc, views,
    complete, done_chunks (units whose marker and chunk files are all present),
    total_chunks, missing_files, digest_ok (metadata as recorded), bytes (logits on disk),
    raw_bytes, ratio). Reads metadata and markers only; `verify` reads every chunk."""
    path = cache_location(path)
    attrs = read_root_attrs(path)
    lay = layout_from_attrs(attrs)
    rows_n = lay.num_slots * lay.num_samples  # raw bytes: (bytes per view - stats) x rows
    rows = []
    root = open_root(path)
    for name in root_array_names(attrs):
        read_array(path, root, name)  # small; names a damaged file
    digests = (attrs.get("digests") or {}).get("mentors") or {}
    for alias, m in list_mentors(path).items():
        marker = read_array(path, root, f"mentors/{alias}/{MARKER}")
        undone, holes = unit_status(path, alias, lay, marker, mentor_specs(m))
        intact = mentor_digest(path, alias, marker) == digests.get(alias)
        mode = m.get("logits_mode", "dense")
        names = ["logits"] if mode == "dense" else \
            [s.name for s in mentor_specs({**m, "features": None}) if s.name != "stats"]
        disk = sum(path.size(f"mentors/{alias}/{name}") for name in names)
        per_view = bytes_per_row(mode, lay.num_classes, np.dtype(lay.dtype).itemsize)
        dense_view = bytes_per_row("dense", lay.num_classes, np.dtype(lay.dtype).itemsize)
        feats = dict(m.get("features") or {})
        rows.append(dict(alias=alias, arch=m.get("arch"), test_acc=m.get("test_acc"),
                         precision=recorded_precision(m),
                         logits_mode=mode, bytes_per_view=per_view,
                         ratio_to_dense=per_view / dense_view, features=feats,
                         feature_bytes=sum(path.size(f"mentors/{alias}/{f}")
                                           for f in feats),
                         train_acc=m.get("train_acc"), views=lay.num_slots,
                         mode=attrs["views"]["mode"], complete=bool(m.get("complete")),
                         done_chunks=len(lay.units()) - len(undone) - len(holes),
                         total_chunks=len(lay.units()),
                         missing_files=sum(len(v) for v in holes.values()),
                         digest_ok=intact or not m.get("complete"), bytes=disk,
                         raw_bytes=(per_view - 8) * rows_n,
                         ratio=(per_view - 8) * rows_n / max(1, disk)))
    return attrs, rows


def _mentor_attrs(path: Path, rep: VerifyReport) -> dict[str, dict[str, Any]]:
    """Every mentor group's attributes; a damaged zarr.json is a problem, not a stop."""
    out = {}
    for name in path.folders("mentors"):
        try:
            attrs = read_json_attrs(path, f"mentors/{name}/zarr.json")
        except CacheReadError as err:
            rep.problems.append(str(err))
            continue
        if "alias" in attrs:
            out[name] = attrs
    return out


def _check_root_arrays(path: Path, attrs: dict[str, Any], root: zarr.Group, lay: Layout,
                       rep: VerifyReport) -> np.ndarray | None:
    digests = attrs.get("digests") or {}
    labels = None
    for name in root_array_names(attrs):
        try:
            vals = read_array(path, root, name)
        except CacheReadError as err:
            rep.problems.append(str(err))
            continue
        rep.chunks_read += 1
        if array_digest(vals) != digests.get(name):
            rep.problems.append(f"{path.file(name)}: values differ from the digest recorded at "
                                "build time")
        if name == "labels" and attrs.get("kind") != "pose":  # pose: annotation ids
            labels = vals
            if vals.shape != (lay.num_samples,) or vals.min() < 0 or \
                    vals.max() >= lay.num_classes:
                rep.problems.append("labels array is missing entries or out of range")
    return labels


def verify(path: str | Path, *, recompute: int = 0, dataset: TrainingData | None = None,
           device: str = "cpu",
           seed: int = 0, progress: bool = False) -> VerifyReport:
    """Every check the format allows: completeness (markers *and* chunk files), each
    chunk read through its crc32c codec and compared with its unit checksum, the digests
    of the root arrays and of each mentor's metadata, finite logits, derived arrays
    (stats) recomputed exactly from the stored logits, and with `recompute` > 0 that many
    random (slot, sample) rows per mentor recomputed from its checkpoint (the logits and
    every feature array the mentor holds)."""
    path = cache_location(path)
    rep = VerifyReport()
    attrs = read_root_attrs(path)
    lay = layout_from_attrs(attrs)
    root = open_root(path)
    mentors = _mentor_attrs(path, rep)
    if not mentors and not rep.problems:
        rep.problems.append("no mentors in the cache")
    labels = _check_root_arrays(path, attrs, root, lay, rep)
    units = lay.units()
    with tqdm(total=len(units) * len(mentors), desc="verify chunks", unit="chunk",
              disable=not progress) as bar:
        for alias, m in mentors.items():
            _verify_mentor(path, attrs, lay, root, alias, m, labels, rep, bar)
    if recompute > 0 and mentors and not rep.problems:
        recompute_rows(path, attrs, lay, root, mentors, recompute, dataset, device, seed, rep)
    return rep


def _verify_mentor(path: Path, attrs: dict[str, Any], lay: Layout, root: zarr.Group, alias: str,
                   m: dict[str, Any], labels: np.ndarray | None, rep: VerifyReport,
                   bar: tqdm) -> None:
    specs = mentor_specs(m)
    columns = marker_columns(specs)
    if not m.get("complete"):
        rep.problems.append(f"{alias}: incomplete (rerun the cache-logits command)")
    try:
        marker = read_array(path, root, f"mentors/{alias}/{MARKER}")
        if m.get("complete") and mentor_digest(path, alias, marker) != \
                (attrs.get("digests") or {}).get("mentors", {}).get(alias):
            rep.problems.append(f"{alias}: metadata (attributes, array metadata or unit "
                                "markers) differs from the digest recorded at build time")
        undone, holes = unit_status(path, alias, lay, marker, specs)
    except CacheReadError as err:
        rep.problems.append(str(err))
        bar.update(len(lay.units()))
        return
    if undone and m.get("complete"):
        rep.problems.append(f"{alias}: {len(undone)} units have no completion marker")
    for files in holes.values():
        rep.problems.extend(f"{f}: missing chunk file (rerun the cache-logits command: it "
                            "rebuilds missing chunks)" for f in files)
    for a, b in lay.units():
        bar.update(1)
        if (a, b) in holes or (a, b) in undone:
            continue
        sr, sm = lay.slot_range(a), lay.sample_range(b)
        region = (slice(sr.start, sr.stop), slice(sm.start, sm.stop))
        named, damaged = {}, []  # every damaged array of the unit is named, not the first
        reads = [(spec.name, region, (a, b, *[0] * len(spec.suffix(lay)))) for spec in specs]
        reads.append((CORRECT, (region[0], slice(b, b + 1)), (a, b)))
        for name, where, coords in reads:
            try:
                named[name] = read_array(path, root, f"mentors/{alias}/{name}", where, coords)
            except CacheReadError as err:
                damaged.append(str(err))
        if damaged:
            rep.problems.extend(damaged)
            continue
        rep.chunks_read += len(named)
        logits = named.get("logits")
        mode = m.get("logits_mode", "dense")
        if mode != "dense":  # sparse: ids in range, counts sum to S, finite values
            rep.problems.extend(sparse_problems(mode, lay.num_classes, named,
                                                f"{alias} unit ({a}, {b}) [{mode}]"))
        dense = ("logits",) if mode == "dense" else ()
        for name in (*dense, *(m.get("features") or {})):
            vals = named[name]
            if not np.isfinite(vals).all():
                rep.problems.append(f"{_unit_chunk(root, alias, name, a, b)}: "
                                    f"{int((~np.isfinite(vals)).sum())} non-finite values")
        for name, vals in named.items():
            try:
                check_unit(path, alias, lay, a, b, name, vals, marker, columns,
                           vals.ndim - 2 if name != CORRECT else 0)
            except CacheReadError as err:
                damaged.append(str(err))
        if damaged:
            rep.problems.extend(damaged)
            continue
        if labels is None or logits is None:  # derived arrays need the dense logits
            continue
        unit = UnitValues(logits, labels[sm.start:sm.stop])
        for spec in specs:
            if spec.derived and not np.array_equal(
                    spec.compute(unit).view(np.uint8), named[spec.name].view(np.uint8)):
                rep.problems.append(f"{_unit_chunk(root, alias, spec.name, a, b)}: differs from "
                                    f"{spec.name} recomputed from the stored logits")


def _unit_chunk(root: zarr.Group, alias: str, name: str, a: int, b: int) -> str:
    """`ALIAS/ARRAY/<chunk key>` of unit (a, b)'s chunk of a mentor array."""
    arr = root[f"mentors/{alias}/{name}"]
    return chunk_key(arr, (a, b, *[0] * (arr.ndim - 2))).removeprefix("mentors/")

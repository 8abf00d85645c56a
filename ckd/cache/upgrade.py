"""`ckd cache upgrade PATH`: convert a version-1 store to the current version in place.

Resumable and atomic per array: an array whose codecs change is written whole beside the
old one (`<name>.upgrade-new`) and swapped in by `ckd.atomic.replace_dir` (a rerun finishes a
swap that a kill interrupted); new per-unit arrays (stats, unit markers) are filled unit by unit,
marker last, like a build. The root attributes get the new version and the digests last,
so until then the store stays a version-1 store that a rerun continues to upgrade.
Units of a version-1 store whose logits chunk file is missing are left undone; the
`ckd cache-logits` command that built the store then rebuilds them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm
from zarr.storage import LocalStore

from ckd.atomic import finish_replace_dir, replace_dir

from .integrity import chunk_key, marker_columns, mentor_digest, root_data_digests, unit_marker
from .layout import (
    CORRECT,
    FORMAT,
    MARKER,
    MENTOR_ARRAYS,
    VERSION,
    CacheMismatchError,
    CacheReadError,
    Layout,
    UnitValues,
    data_codecs,
    layout_from_attrs,
    read_error,
    read_json_attrs,
)
from .location import cache_location
from .lock import writer_lock
from .mentor_stats import STAT_FIELDS
from .reader import list_mentors, open_root, read_array
from .store import clean_partials, create_mentor_arrays

_MENTOR_KEYS = ("alias", "arch", "num_classes", "checkpoint", "checkpoint_sha256")
V1_ARRAYS = ("logits",)  # the declared arrays a version-1 mentor already holds


def _has_checksum(folder: Path, store: Path) -> bool:
    try:
        meta = json.loads((folder / "zarr.json").read_bytes())
    except (OSError, ValueError) as err:
        raise read_error(store, str(folder / "zarr.json"), err) from err
    return any(c.get("name") == "crc32c" for c in meta.get("codecs", []))


def _rewrite_with_checksum(store: Path, name: str) -> None:
    """Rewrite array `name` with `data_codecs` (compression + crc32c), atomically: written
    whole as `<name>.upgrade-new`, then swapped in; a rerun completes an interrupted swap."""
    cur, new = store / name, store / f"{name}.upgrade-new"
    finish_replace_dir(new, cur)
    if _has_checksum(cur, store):
        return
    arr = zarr.open_array(LocalStore(store), path=name, mode="r")
    vals = read_array(store, open_root(store), name)
    shutil.rmtree(new, ignore_errors=True)
    fresh = zarr.create_array(
        LocalStore(store), name=f"{name}.upgrade-new", shape=arr.shape, chunks=arr.chunks,
        dtype=vals.dtype, fill_value=arr.metadata.fill_value,
        dimension_names=arr.metadata.dimension_names, config={"write_empty_chunks": True},
        **data_codecs(str(vals.dtype)))
    fresh[...] = vals
    replace_dir(new, cur)


def _upgrade_mentor(store: Path, alias: str, attrs: dict[str, Any], lay: Layout,
                    labels: np.ndarray, progress: bool) -> list[str]:
    base = f"mentors/{alias}"
    mdir = store / "mentors" / alias
    _rewrite_with_checksum(store, f"{base}/{CORRECT}")
    added = [s for s in MENTOR_ARRAYS if s.name not in V1_ARRAYS]
    missing = [s.name for s in added if not (mdir / s.name).exists()]
    missing += [MARKER] if not (mdir / MARKER).exists() else []
    not_derivable = [s.name for s in added if not s.derived]
    if not_derivable:  # arrays only a mentor run can produce: cache-logits recomputes all
        raise CacheMismatchError(f"mentor {alias!r}: arrays {not_derivable} cannot be derived "
                                 "from stored logits")
    if missing:
        create_mentor_arrays(store, alias, lay, names=set(missing))
    grp = zarr.open_group(LocalStore(store), path=base, mode="r+")
    root, loc = open_root(store), cache_location(store)
    columns = marker_columns(MENTOR_ARRAYS)
    correct = read_array(store, root, f"{base}/{CORRECT}")
    marker = grp[MARKER][:]
    notes, left = [], 0
    for a, b in tqdm(lay.units(), desc=f"upgrade {alias}", unit="chunk", disable=not progress):
        sr, sm = lay.slot_range(a), lay.sample_range(b)
        if (marker[a, b] >= 0).all() or (correct[sr.start:sr.stop, b] < 0).any():
            left += int((marker[a, b] < 0).any())  # done, or never computed by version 1
            continue
        key = chunk_key(root[f"{base}/logits"], (a, b, 0))
        try:
            if not loc.exists(key):
                raise read_error(loc, loc.file(key), FileNotFoundError("missing chunk file"))
            logits = read_array(store, root, f"{base}/logits",
                                (slice(sr.start, sr.stop), slice(sm.start, sm.stop)),
                                (a, b, 0))
        except CacheReadError as err:
            notes.append(f"{alias}: unit ({a}, {b}) left for cache-logits to rebuild: {err}")
            left += 1
            continue
        unit = UnitValues(logits, labels[sm.start:sm.stop])
        named = {s.name: s.compute(unit) for s in MENTOR_ARRAYS}
        named[CORRECT] = correct[sr.start:sr.stop, b:b + 1]
        for s in added:
            grp[s.name][sr.start:sr.stop, sm.start:sm.stop] = named[s.name]
        grp[MARKER][a:a + 1, b:b + 1] = unit_marker(a, b, named, columns)
    new_attrs = {**{k: attrs[k] for k in _MENTOR_KEYS},
                 "arrays": [s.name for s in MENTOR_ARRAYS], "stat_fields": list(STAT_FIELDS),
                 **{k: v for k, v in attrs.items() if k not in _MENTOR_KEYS
                    and k not in ("arrays", "stat_fields", "complete")},
                 "complete": bool(attrs.get("complete")) and left == 0}
    if left and attrs.get("complete"):
        notes.append(f"{alias}: {left} unit(s) to recompute: rerun the `ckd cache-logits "
                     f"--out {store} ...` command that built the store")
    if new_attrs != attrs:
        grp.attrs.put(new_attrs)
    return notes


def upgrade(path: str | Path, progress: bool = False) -> list[str]:
    """Upgrade the store at `path` to the current format version; returns notes (units left
    for `ckd cache-logits` to rebuild). A store already at this version is left as is."""
    if str(path).startswith("s3://"):
        raise ValueError(f"{path}: `ckd cache upgrade` converts local stores only (version-1 "
                         "stores predate object-store caches): download it with your S3 "
                         "client, upgrade the local folder, then upload it with `ckd cache "
                         "copy LOCAL s3://...`")
    path = Path(path)
    attrs = read_json_attrs(path, "zarr.json", missing=f"no logit cache at {path}")
    if attrs.get("format") != FORMAT:
        raise CacheMismatchError(f"{path} is not a {FORMAT} store "
                                 f"(format={attrs.get('format')!r})")
    if attrs.get("version") == VERSION:
        return [f"{path} is already at cache format version {VERSION}"]
    if attrs.get("version") != 1:
        raise CacheMismatchError(f"{path} has cache format version {attrs.get('version')!r}; "
                                 f"`ckd cache upgrade` converts version 1 to {VERSION}")
    notes = []
    with writer_lock(path, "ckd cache upgrade"):
        clean_partials(cache_location(path))  # temp files of a killed write
        lay = layout_from_attrs(attrs)
        keyed = attrs["views"]["mode"] == "keyed"
        for name in ("labels", "view_ids") if keyed else ("labels",):
            _rewrite_with_checksum(path, name)
        labels = read_array(path, open_root(path), "labels")
        vid = read_array(path, open_root(path), "view_ids") if keyed else None
        digests = {**root_data_digests(labels, vid), "mentors": {}}
        for alias, m in list_mentors(path).items():
            notes += _upgrade_mentor(path, alias, m, lay, labels, progress)
            m = read_json_attrs(path, f"mentors/{alias}/zarr.json")
            if m.get("complete"):
                marker = zarr.open_array(LocalStore(path), path=f"mentors/{alias}/{MARKER}",
                                         mode="r")[:]
                digests["mentors"][alias] = mentor_digest(path, alias, marker)
        digests["mentors"] = dict(sorted(digests["mentors"].items()))
        zarr.open_group(LocalStore(path), mode="r+").attrs.put(
            {**attrs, "version": VERSION, "digests": digests})
    return notes

"""Store set-up for `build_cache` (rank 0 only): create or check the root group and
each mentor group before any rank writes. Arrays are created first and attributes last,
so "attributes present" means "initialized" even after a kill -9 mid-way."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ckd.data.protocol import TrainingData

from .integrity import mentor_specs, root_data_digests, unit_status
from .layout import (
    FEATURES,
    LOCK_FILE,
    MARKER,
    MENTOR_ARRAYS,
    CacheMismatchError,
    Layout,
    check_compatible,
    check_version,
    data_codecs,
    layout_from_attrs,
    marker_arrays_kwargs,
    read_json_attrs,
)
from .location import CacheLocation, zarr_store
from .mentor_stats import STAT_FIELDS
from .mentors import mentor_arch, mentor_arch_kwargs, recorded_precision


def clean_partials(out: CacheLocation) -> None:
    """Remove the `*.partial` temp files a kill -9 left mid-write (zarr writes tmp + rename;
    an object store's puts are atomic and leave none)."""
    if out.local is None:
        return
    for key in out.keys():
        if key.endswith(".partial"):
            out.delete(key)


def clear_store(out: CacheLocation) -> None:
    """Delete everything in `out` but the writer lock (held by this process)."""
    folders = set(out.folders())
    for name in out.children():
        if name in folders:
            out.delete_dir(name)
        elif name != LOCK_FILE:
            out.delete(name)


# the entries of a store (and of a partial `ckd cache copy`, which records its source)
_STORE_ENTRIES = {"zarr.json", "labels", "view_ids", "mentors", ".ckd-copy-source"}


def space_needed(out: CacheLocation, aliases: Any) -> int:
    """Upper bound of the bytes a build still writes: the raw (uncompressed) size of every
    array of each incomplete mentor, less what its folder already holds."""
    root = zarr.open_group(zarr_store(out), mode="r")
    need = 0
    for alias in aliases:
        grp = root[f"mentors/{alias}"]
        if grp.attrs.get("complete"):
            continue
        raw = sum(int(a.nbytes) for _, a in grp.arrays())
        held = sum(size for f, size in out.sizes(f"mentors/{alias}").items()
                   if not f.endswith("zarr.json"))  # chunks written so far
        need += max(0, raw - held)
    return need


def check_free_space(out: CacheLocation, need: int) -> None:
    """Refuse a build the disk cannot hold, before any mentor runs (an object store has
    no such limit to check)."""
    if out.local is None:
        return
    free = shutil.disk_usage(out.local).free
    if need > free:
        raise OSError(errno.ENOSPC, f"{out}: this build still writes up to {need / 2**30:.2f} "
                      f"GiB (uncompressed; compression saves ~20 %) but only "
                      f"{free / 2**30:.2f} GiB is free there: free space, or pass --out on "
                      "a bigger disk")


def disk_full(out: CacheLocation, need: int, err: OSError) -> OSError:
    """The error for a write that hit a full disk, after removing its temp files."""
    clean_partials(out)
    return OSError(errno.ENOSPC, f"disk full while writing {out} ({err}); the build needed up "
                   f"to {need / 2**30:.2f} GiB more: free space and rerun the same command "
                   "(it resumes where it stopped)")


def check_out_folder(out: CacheLocation) -> None:
    """Refuse an --out that exists but is not a cache (before taking its writer lock)."""
    if out.local is not None and out.local.is_file():
        raise FileExistsError(f"{out} is a file, not a logit cache folder: choose another --out")
    names = set(out.children()) - {LOCK_FILE}
    if names and not names <= _STORE_ENTRIES:
        raise FileExistsError(f"{out} exists and is not a logit cache (holds "
                              f"{sorted(names)[:5]}): choose another --out or delete it")


def _open_root(out: CacheLocation) -> dict[str, Any] | None:
    """The root attributes if `out` is an initialized cache (attrs written), else None."""
    if not out.exists("zarr.json"):
        return None
    attrs = read_json_attrs(out, "zarr.json")
    if "format" not in attrs:
        return None
    check_version(attrs, out)
    return attrs


def _init_root(out: CacheLocation, attrs: dict[str, Any], labels: np.ndarray,
               view_ids: np.ndarray | None) -> None:
    """Create arrays first and the root attributes last: attrs present == initialized."""
    check_out_folder(out)
    clear_store(out)  # an interrupted initialization: start it again
    store = zarr_store(out)
    lab = zarr.create_array(store, name="labels", shape=labels.shape, dtype="int64",
                            chunks=labels.shape, fill_value=-1, **data_codecs("int64"))
    lab[:] = labels
    if view_ids is not None:
        vid = zarr.create_array(store, name="view_ids", shape=view_ids.shape, dtype="int16",
                                chunks=(1, view_ids.shape[1]), fill_value=-1,
                                config={"write_empty_chunks": True}, **data_codecs("int16"))
        vid[:] = view_ids
    zarr.open_group(store, path="mentors", mode="a")
    digests = {**root_data_digests(np.asarray(labels, dtype=np.int64), view_ids), "mentors": {}}
    zarr.open_group(store, mode="r+").attrs.put({**attrs, "digests": digests})


def _mentor_attrs(alias: str, arch: str, path: Path, sha: str, num_classes: int,
                  extra: dict[str, Any] | None = None,
                  features: Mapping[str, Any] | None = None) -> dict[str, Any]:
    attrs = {"alias": alias, "arch": arch, "num_classes": int(num_classes),
             "checkpoint": str(path), "checkpoint_sha256": sha,
             "arrays": [s.name for s in MENTOR_ARRAYS], "stat_fields": list(STAT_FIELDS),
             "complete": False}
    if features:
        attrs["features"] = {k: [int(d) for d in v] for k, v in features.items()}
    attrs.update(extra or {})
    # the declared arrays of its storage mode (a sparse mentor: docs/SPARSE.md)
    attrs["arrays"] = [s.name for s in mentor_specs({**attrs, "features": None,
                                                     "arrays": None})]
    return attrs


def create_mentor_arrays(out: CacheLocation, alias: str, layout: Layout, names: Any = None,
                         attrs: Mapping[str, Any] | None = None) -> None:
    """Create the declared arrays (and the feature arrays `attrs` lists) and the per-unit
    arrays of a mentor (only those in `names` if given: `ckd cache upgrade` adds the ones
    a version-1 store lacks, --features the feature arrays an existing mentor lacks)."""
    store = zarr_store(out)
    keys = ("features", "boxes", "logits_mode", "num_classes", "kind", "pose")
    specs = mentor_specs({k: v for k, v in (attrs or {}).items() if k in keys})
    for spec in specs:
        if names is None or spec.name in names:
            zarr.create_array(store, name=f"mentors/{alias}/{spec.name}",
                              overwrite=spec.name in FEATURES,  # a retried --features
                              **spec.create_kwargs(layout))
    for name, kw in marker_arrays_kwargs(layout, len(specs)).items():
        if names is None or name in names:
            zarr.create_array(store, name=f"mentors/{alias}/{name}", overwrite=True, **kw)


def _init_mentor(out: CacheLocation, alias: str, layout: Layout, attrs: dict[str, Any]) -> None:
    out.delete_dir(f"mentors/{alias}")
    create_mentor_arrays(out, alias, layout, attrs=attrs)
    zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r+").attrs.put(attrs)


def add_features(out: CacheLocation, alias: str, layout: Layout, state: dict[str, Any],
                 features: Mapping[str, Any]) -> bool:
    """Give an existing mentor the feature arrays it lacks (True if any): the arrays are
    created, the unit markers reset (a unit is redone whole: one forward gives its logits,
    identical to the stored ones, and its features) and the mentor marked incomplete; a
    later interruption resumes from the units already redone."""
    have = dict(state.get("features") or {})
    new = {k: [int(d) for d in v] for k, v in features.items() if k not in have}
    if not new:
        return False
    grp = zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r+")
    attrs = {**state, "features": {**have, **new}, "complete": False}
    # incomplete first: a kill between the steps leaves a mentor that is rebuilt, never
    # one that claims features it does not hold
    grp.attrs.put({**state, "complete": False})
    create_mentor_arrays(out, alias, layout, names=[*new, MARKER], attrs=attrs)
    grp.attrs.put(attrs)
    return True


def _mentor_state(out: CacheLocation, alias: str) -> dict[str, Any] | None:
    base = f"mentors/{alias}"
    if not out.exists(f"{base}/zarr.json"):
        return None
    attrs = read_json_attrs(out, f"{base}/zarr.json")
    for array in out.folders(base):
        if out.exists(f"{base}/{array}/zarr.json"):  # a damaged array's metadata, named
            read_json_attrs(out, f"{base}/{array}/zarr.json")
    return attrs if "alias" in attrs else None


def _reopen_holes(out: CacheLocation, alias: str, layout: Layout, state: dict[str, Any]) -> None:
    """A mentor with missing chunk files is complete no more: drop the markers of the
    damaged units (so the ranks recompute them) and its `complete` flag."""
    grp = zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r+")
    marker = grp[MARKER][:]
    undone, holes = unit_status(out, alias, layout, marker, mentor_specs(state))
    for a, b in holes:
        grp[MARKER][a:a + 1, b:b + 1] = -1
    if (undone or holes) and state.get("complete"):
        grp.attrs.put({**state, "complete": False})


def prepare_store(out: CacheLocation, attrs: dict[str, Any], dataset: TrainingData,
                  keyed_ids: torch.Tensor | None,
                  layout: Layout, paths: Mapping[str, Path], shas: Mapping[str, str],
                  overwrite: bool, features: Mapping[str, Mapping[str, Any]] | None = None,
                  mentor_extra: Callable[[str, str], dict[str, Any]] | None = None,
                  modes: Mapping[str, str] | None = None, precision: str = "fp32",
                  deterministic: bool = False,
                  arch_of: Callable[[str, Path], str] = mentor_arch) -> None:
    """Rank 0: create or check the store and every mentor group before anyone writes.
    `mentor_extra(alias, arch)`: attributes a mentor gets beyond the standard ones (image
    folders: its resolution and `boxes`); `modes`: alias -> logit storage mode;
    `precision`: the mentors' forward precision (a mentor cached at another is refused);
    `deterministic`: --deterministic, recorded per mentor (a resume must match it);
    `arch_of(alias, path)`: a mentor's architecture (pose caches read their own checkpoints)."""
    if out.local is not None:
        out.local.mkdir(parents=True, exist_ok=True)
    clean_partials(out)
    have = _open_root(out)
    if have is not None:
        try:
            check_compatible(have, dataset_name=attrs["dataset"]["name"],
                             fingerprint=attrs["dataset"]["fingerprint"],
                             num_classes=attrs["num_classes"], recipe=attrs["views"]["recipe"],
                             path=str(out))
            for key, what in (("views", "--views/--seed"), ("dtype", "--dtype")):
                if have[key] != attrs[key]:
                    raise CacheMismatchError(
                        f"{out} was built with other {what} ({key}: {have[key]} vs requested "
                        f"{attrs[key]}): use the same options, another --out, or --overwrite")
        except CacheMismatchError:
            if not overwrite:
                raise
            clear_store(out)
            have = None
    if have is None:
        vid = None if keyed_ids is None else keyed_ids.numpy()
        _init_root(out, attrs, dataset.train.labels, vid)
    layout = layout_from_attrs(read_json_attrs(out, "zarr.json"))
    # every mentor is checked before any is written: a refused one leaves the store as it was
    plans = [_mentor_plan(out, alias, path, shas[alias], overwrite, mentor_extra,
                          (modes or {}).get(alias, "dense"), precision, deterministic, arch_of)
             for alias, path in paths.items()]
    for alias, path, arch, state, extra in plans:
        feats = (features or {}).get(alias) or {}
        if state is None:
            _init_mentor(out, alias, layout,
                         _mentor_attrs(alias, arch, path, shas[alias], layout.num_classes,
                                       extra, features=feats))
        elif not add_features(out, alias, layout, {**state, **extra}, feats):
            _reopen_holes(out, alias, layout, state)


def _mentor_plan(out: CacheLocation, alias: str, path: Path, sha: str, overwrite: bool,
                 mentor_extra: Callable[[str, str], dict[str, Any]] | None, mode: str,
                 precision: str, deterministic: bool,
                 arch_of: Callable[[str, Path], str] = mentor_arch,
                 ) -> tuple[str, Path, str, dict[str, Any] | None, dict[str, Any]]:
    """(alias, path, arch, its stored state or None when it is (re)built, its extra
    attributes); refuses a stored mentor that differs from the request unless
    `overwrite`."""
    state = _mentor_state(out, alias)
    arch = arch_of(alias, path)
    extra = mentor_extra(alias, arch) if mentor_extra else {}
    if state is not None and extra.get("resolution") != state.get("resolution"):
        if not overwrite:
            raise CacheMismatchError(
                f"mentor {alias!r} in {out} was cached at resolution "
                f"{state.get('resolution')}, {extra.get('resolution')} requested: use the "
                "same --resolution, another alias, or --overwrite")
        state = None
    extra = {**extra, "logits_mode": mode, "precision": precision,
             "deterministic": bool(deterministic)}
    if state is not None and recorded_precision(state) != precision:
        if not overwrite:
            raise CacheMismatchError(
                f"mentor {alias!r} in {out} was cached at --precision "
                f"{recorded_precision(state)}, requested {precision}: pass --precision "
                f"{recorded_precision(state)} to resume or add to it, --overwrite to "
                "recompute it, or use another alias or --out")
        state = None
    # an unfinished mentor resumes with the setting its first units were computed with
    # (a complete one is left as recorded: no forward pass runs for it)
    if state is not None and not state.get("complete") and \
            bool(state.get("deterministic")) != bool(deterministic):
        if not overwrite:
            had = bool(state.get("deterministic"))
            raise CacheMismatchError(
                f"mentor {alias!r} in {out} was started {'with' if had else 'without'} "
                f"--deterministic: resume it {'with' if had else 'without'} "
                "--deterministic (as it was started), or pass --overwrite to recompute "
                "it, or use another alias or --out")
        state = None
    kwargs = mentor_arch_kwargs(path)
    if kwargs:  # the widths a `--student-kwargs` run was built with
        extra["arch_kwargs"] = kwargs
    if state is not None and state.get("logits_mode", "dense") != mode:
        if not overwrite:
            raise CacheMismatchError(
                f"mentor {alias!r} in {out} is stored as --logits "
                f"{state.get('logits_mode', 'dense')}, requested {mode}: pass --overwrite "
                "to recompute it, or use another alias or --out")
        state = None
    if state is not None and state["checkpoint_sha256"] != sha:
        if not overwrite:
            raise CacheMismatchError(
                f"mentor {alias!r} in {out} was cached from a checkpoint with sha256 "
                f"{state['checkpoint_sha256'][:12]}..., {path} has {sha[:12]}...: "
                "pass --overwrite to recompute it, or use another alias")
        state = None
    return alias, path, arch, state, extra

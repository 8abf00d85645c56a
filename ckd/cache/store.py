"""Store set-up for `build_cache` (rank 0 only): create or check the root group and
each mentor group before any rank writes. Arrays are created first and attributes last,
so "attributes present" means "initialized" even after a kill -9 mid-way."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from .layout import CacheMismatchError, Layout, check_compatible, layout_from_attrs, logits_codecs
from .mentors import mentor_arch


def _clean_partials(out: Path) -> None:
    """Remove `*.partial` temp files a kill -9 left mid-write (zarr writes tmp + rename)."""
    for p in out.rglob("*.partial"):
        p.unlink(missing_ok=True)


def _open_root(out: Path) -> zarr.Group | None:
    """The root group if `out` is an initialized cache (attrs written), else None."""
    if not (out / "zarr.json").exists():
        return None
    root = zarr.open_group(LocalStore(out), mode="r+")
    return root if "format" in root.attrs else None


def _init_root(out: Path, attrs: dict[str, Any], labels: np.ndarray,
               view_ids: np.ndarray | None) -> None:
    """Create arrays first and the root attributes last: attrs present == initialized."""
    if out.exists() and any(out.iterdir()):
        leftovers = {p.name for p in out.iterdir()}
        if not leftovers <= {"zarr.json", "labels", "view_ids", "mentors"}:
            raise FileExistsError(
                f"{out} exists and is not a logit cache (holds {sorted(leftovers)[:5]}): "
                "choose another --out or delete it")
        shutil.rmtree(out)  # an interrupted initialization: start it again
    store = LocalStore(out)
    lab = zarr.create_array(store, name="labels", shape=labels.shape, dtype="int64",
                            chunks=labels.shape, fill_value=-1)
    lab[:] = labels
    if view_ids is not None:
        vid = zarr.create_array(store, name="view_ids", shape=view_ids.shape, dtype="int16",
                                chunks=(1, view_ids.shape[1]), fill_value=-1)
        vid[:] = view_ids
    zarr.open_group(store, path="mentors", mode="a")
    zarr.open_group(store, mode="r+").attrs.put(attrs)


def _mentor_attrs(alias: str, arch: str, path: Path, sha: str, num_classes: int,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    attrs = {"alias": alias, "arch": arch, "num_classes": int(num_classes),
             "checkpoint": str(path), "checkpoint_sha256": sha, "complete": False}
    attrs.update(extra or {})
    return attrs


def _init_mentor(out: Path, alias: str, layout: Layout, attrs: dict[str, Any]) -> None:
    mdir = out / "mentors" / alias
    if mdir.exists():
        shutil.rmtree(mdir)
    store = LocalStore(out)
    zarr.create_array(store, name=f"mentors/{alias}/logits", shape=layout.shape,
                      chunks=layout.chunks, dtype=layout.dtype, fill_value=0,
                      dimension_names=("slot", "sample", "class"),
                      config={"write_empty_chunks": True}, **logits_codecs(layout))
    na, nb = layout.grid
    zarr.create_array(store, name=f"mentors/{alias}/train_correct",
                      shape=(layout.num_slots, nb), chunks=(layout.slots_per_chunk, 1),
                      dtype="int32", fill_value=-1, dimension_names=("slot", "block"),
                      config={"write_empty_chunks": True})
    zarr.open_group(store, path=f"mentors/{alias}", mode="r+").attrs.put(attrs)


def _mentor_state(out: Path, alias: str) -> dict[str, Any] | None:
    if not (out / "mentors" / alias / "zarr.json").exists():
        return None
    attrs = zarr.open_group(LocalStore(out), path=f"mentors/{alias}", mode="r").attrs.asdict()
    return attrs if "alias" in attrs else None


def prepare_store(out: Path, attrs: dict[str, Any], dataset: Any, keyed_ids: torch.Tensor | None,
             layout: Layout, paths: Mapping[str, Path], shas: Mapping[str, str],
             overwrite: bool) -> None:
    """Rank 0: create or check the store and every mentor group before anyone writes."""
    out.mkdir(parents=True, exist_ok=True)
    _clean_partials(out)
    root = _open_root(out)
    if root is not None:
        have = root.attrs.asdict()
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
            shutil.rmtree(out)
            out.mkdir(parents=True)
            root = None
    if root is None:
        vid = None if keyed_ids is None else keyed_ids.numpy()
        _init_root(out, attrs, dataset.train.labels, vid)
    layout = layout_from_attrs(zarr.open_group(LocalStore(out), mode="r").attrs.asdict())
    for alias, path in paths.items():
        state = _mentor_state(out, alias)
        if state is not None and state["checkpoint_sha256"] != shas[alias]:
            if not overwrite:
                raise CacheMismatchError(
                    f"mentor {alias!r} in {out} was cached from a checkpoint with sha256 "
                    f"{state['checkpoint_sha256'][:12]}..., {path} has {shas[alias][:12]}...: "
                    "pass --overwrite to recompute it, or use another alias")
            state = None
        if state is None:
            arch = mentor_arch(alias, path)
            _init_mentor(out, alias, layout,
                         _mentor_attrs(alias, arch, path, shas[alias], layout.num_classes))



"""The pose logit cache: the project's Zarr cache (docs/CACHE_FORMAT.md, version 2) with
root and mentor attribute `kind: "pose"`. Each mentor holds its rows of joint logits on S
keyed views of every training crop, its per-view PCK (the ranking key) and the views'
parameters (`ckd/cache/pose_arrays.py` declares the arrays).

Written by the cache package's machinery: `prepare_store` (compatibility, resume,
--overwrite), the writer lock, `UnitWriter` (every chunk of a work unit, then its crc32c
marker), the mentor digests; read after `check_store` (digests, holes, markers) with every
unit checked against its marker; `ckd cache verify` runs the generic checks and, with
`--recompute`, re-derives every view's parameters and recomputes rows and PCK.

View s of sample i is `ckd.pose.views.view_params(seed, i, s)`; a run seeded r replays in
epoch e the slot `ckd.data.rrc.epoch_slots(r, e, i, S)`, with or without this cache.
Mentors run at one batch shape (`ckd.pose.mentors.MENTOR_BATCH`), so a student from an
fp32 cache equals the same run with the mentors evaluated online, bit for bit (CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from ckd.atomic import safe_torch_load
from ckd.cache.integrity import check_unit, marker_columns, mentor_specs
from ckd.cache.layout import (
    DEFAULT_CODEC,
    DTYPES,
    MARKER,
    CacheIncompleteError,
    CacheMismatchError,
    check_compatible,
    layout_from_attrs,
    make_layout,
    read_json_attrs,
    read_root_attrs,
    root_attributes,
)
from ckd.cache.location import CacheLocation, cache_location, zarr_store
from ckd.cache.lock import writer_lock
from ckd.cache.pose_arrays import POSE_KIND, id_dtype
from ckd.cache.reader import check_store, list_mentors, open_root, read_array
from ckd.cache.store import check_out_folder, prepare_store
from ckd.cache.writer import UnitWriter, record_mentor_digest
from ckd.hashing import epoch_seed
from ckd.kernels.sparse_mentors import SparseMentors
from ckd.models import file_sha256
from ckd.pose.mentors import batch_views, load_pose_mentor
from ckd.pose.models import Layout
from ckd.pose.views import RECIPE, view_params

STORAGES = ("dense", "topk")
RANK_KEY = "pck@0.05-input"


def parse_storage(spec: str, kind: str) -> tuple[str, int]:
    mode, _, k = str(spec).partition(":")
    if mode == "dense" and not k:
        return "dense", 0
    if mode == "topk" and k.isdigit() and int(k) >= 1:
        if kind != "heatmap":
            raise ValueError("top-k sparse storage is for heatmap rows; cache SimCC rows with "
                             "--logits dense")
        return "topk", int(k)
    raise ValueError(f"--logits {spec!r}: use dense or topk:K (heatmaps)")


def view_table(seed: int, n: int, slots: int) -> torch.Tensor:
    """float64 [S, N, 3]: the parameters of every cached view."""
    idx = torch.arange(n)
    return torch.stack([view_params(seed, idx, s) for s in range(slots)])


def mentor_aliases(paths: list[str]) -> dict[str, str]:
    """alias -> checkpoint for `ALIAS=PATH` items or plain paths (alias: the folder of a
    `student.pt`, else the file's stem), in the given order (the first is the teacher)."""
    out: dict[str, str] = {}
    for item in paths:
        alias, sep, path = str(item).partition("=")
        if not sep:
            p = Path(item)
            alias, path = (p.parent.name if p.stem == "student" else p.stem), item
        if alias in out:
            raise ValueError(f"two mentors named {alias!r}: name them, e.g. "
                             f"--mentors teacher={path},peer=...")
        out[alias] = path
    return out


def _pose_arch(alias: str, path: Path) -> str:
    return str(safe_torch_load(Path(path))["arch"])


def topk_rows(rows: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per joint row [.., D]: the k largest logits, their cells and the rest's (logsumexp,
    mean logit): the K+1-bucket rows of docs/SPARSE.md."""
    vals, ids = rows.topk(k, dim=-1, sorted=True)
    if k < rows.shape[-1]:
        rest_lse = torch.logsumexp(rows.scatter(-1, ids, float("-inf")), -1)
    else:
        rest_lse = torch.full(rows.shape[:-1], float("-inf"))
    rest_mean = (rows.double().sum(-1) - vals.double().sum(-1)).float() / max(
        1, rows.shape[-1] - k)
    return {"topk_ids": ids, "topk_logits": vals, "topk_rest": torch.stack([rest_lse, rest_mean],
                                                                           -1)}


def _unit_outputs(mentor, x, kps, weight, params, mode: str, k: int, dtype: str):
    """What one mentor's unit piece stores: (rows in the store dtype, arrays, hits)."""
    rows, key = mentor.rows_and_key(x, kps, weight)
    if not torch.isfinite(rows).all():
        raise FloatingPointError(f"mentor {mentor.name} produced non-finite rows: the "
                                 "checkpoint is broken or diverged; retrain or replace it")
    if dtype == "float16" and float(rows.abs().max()) > 65504.0:
        raise OverflowError("a mentor's logits exceed float16's range: rebuild this cache "
                            "with --dtype fp32")
    hits = int(torch.nan_to_num(key.double() * weight.sum(1).double()).round().sum())
    out = {"pck": key.numpy().astype(np.float32), "view_params": params.numpy()}
    if mode == "topk":
        sp = topk_rows(rows, k)
        out["topk_ids"] = sp["topk_ids"].numpy().astype(id_dtype(rows.shape[-1]))
        out["topk_logits"] = sp["topk_logits"].numpy().astype(dtype)
        out["topk_rest"] = sp["topk_rest"].numpy().astype(np.float32)
    return rows.numpy().astype(dtype), out, hits


def build_pose_cache(ds, mentor_paths, out: str | Path, *, seed: int = 0, slots: int = 4,
                     dtype: str = "fp16", storage: str = "dense", batch_size: int = 256,
                     progress: bool = True, overwrite: bool = False,
                     codec: str | None = None) -> Path:
    """Run every mentor over S keyed views of the training crops into a Zarr pose cache
    (`mentor_paths`: checkpoints or ALIAS=PATH, the first the teacher). Rerunning resumes;
    mentors are added to an existing cache of the same data, views and dtype."""

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use fp16 or fp32")
    if slots < 1:
        raise ValueError(f"--views {slots}: need at least one view per sample")
    paths = {a: Path(p) for a, p in (mentor_aliases(list(mentor_paths)).items()
                                     if not isinstance(mentor_paths, dict)
                                     else mentor_paths.items())}
    mentors = {a: load_pose_mentor(p, ds) for a, p in paths.items()}
    layouts = {m.layout for m in mentors.values()}
    if len(layouts) != 1:
        raise ValueError(f"mentors disagree on their rows ({sorted(str(x) for x in layouts)}); "
                         "cache mentors of one head type and size together")
    layout = next(iter(layouts))
    mode, k = parse_storage(storage, layout.kind)
    n, store_dtype = len(ds.train), DTYPES[dtype]
    lay = make_layout(slots, n, layout.num_joints * layout.row_size, keyed=True,
                      dtype=store_dtype, codec=codec or DEFAULT_CODEC)
    attrs = root_attributes(
        dataset_name=ds.name, fingerprint=ds.meta["fingerprint"], num_samples=n,
        num_test=len(ds.test), num_classes=lay.num_classes, recipe=RECIPE, keyed=True,
        num_slots=slots, seeds=[epoch_seed(seed, s) for s in range(slots)],
        mean=ds.meta["mean"], std=ds.meta["std"], layout=lay)
    attrs["views"]["seed"] = int(seed)
    pose = {"num_joints": layout.num_joints, "row_size": layout.row_size,
            "layout": layout.to_dict(), "input_size": list(ds.input_size),
            "joints": list(ds.meta["joints"]), "rank_key": RANK_KEY}
    attrs.update(kind=POSE_KIND, pose={**pose, "mentors": list(paths)})
    out = cache_location(out)
    check_out_folder(out)
    shas = {a: file_sha256(p) for a, p in paths.items()}
    labels = ds.train.ann_ids.astype(np.int64)
    with writer_lock(out, "ckd cache-logits"):
        prepare_store(out, attrs, SimpleNamespace(train=SimpleNamespace(labels=labels)), None,
                      lay, paths, shas, overwrite, None,
                      lambda alias, arch: {"kind": POSE_KIND, "pose": pose},
                      {a: storage if mode == "topk" else "dense" for a in paths},
                      arch_of=_pose_arch)
        _record_order(out, list(paths))
        lay = layout_from_attrs(read_json_attrs(out, "zarr.json"))  # the store's wins
        writers = {a: UnitWriter(out, a, lay, labels) for a in paths}
        todo = {a: [] if w.complete else _undone(w, lay) for a, w in writers.items()}
        units = sorted({u for us in todo.values() for u in us}, key=lay.units().index)
        for a, b in tqdm(units, desc="cache pose views", disable=not progress, leave=False):
            idx = torch.arange(lay.sample_range(b).start, lay.sample_range(b).stop)
            params = view_params(seed, idx, a)  # one slot per chunk (keyed layout)
            parts = {alias: [] for alias in paths if (a, b) in todo[alias]}
            for s in range(0, len(idx), batch_size):
                x, kps, w, _ = batch_views(ds, ds.train, idx[s:s + batch_size],
                                           params[s:s + batch_size])
                for alias in parts:
                    parts[alias].append(_unit_outputs(mentors[alias], x, kps, w,
                                                      params[s:s + batch_size], mode, k,
                                                      store_dtype))
            for alias, got in parts.items():
                rows = np.concatenate([g[0] for g in got])[None]
                arrays = {name: np.concatenate([g[1][name] for g in got])[None]
                          for name in got[0][1]}
                writers[alias].write(a, b, rows, np.array([sum(g[2] for g in got)]), arrays)
        for alias, w in writers.items():
            if not w.complete:
                _finish_mentor(out, alias, lay)
            record_mentor_digest(out, alias, only_if_missing=w.complete)
    return out.local if out.local is not None else out.url  # a folder, or the URL


def _undone(writer, lay) -> list[tuple[int, int]]:
    marker = writer.marker[:]
    return [(a, b) for a, b in lay.units() if (marker[a, b] < 0).any()]


def _record_order(out: CacheLocation, aliases: list[str]) -> None:
    """The root's `pose.mentors`: the cache's mentors in order (new ones appended)."""
    attrs = read_json_attrs(out, "zarr.json")
    have = list(attrs["pose"].get("mentors") or [])
    order = have + [a for a in aliases if a not in have]
    if order != have:
        zarr.open_group(zarr_store(out), mode="r+").attrs.put(
            {**attrs, "pose": {**attrs["pose"], "mentors": order}})


def _finish_mentor(out: CacheLocation, alias: str, lay) -> None:
    """Mark a mentor complete with its train PCK per view (mean ranking key, %)."""
    grp = zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r+")
    marker = grp[MARKER][:]
    if (marker < 0).any():
        raise RuntimeError(f"mentor {alias!r}: units still missing; rerun the same command")
    per_view = [float(np.nanmean(grp["pck"][s])) * 100.0 for s in range(lay.num_slots)]
    grp.attrs.put({**grp.attrs.asdict(), "train_pck_per_view": [round(v, 4) for v in per_view],
                   "train_acc": round(float(np.mean(per_view)), 4), "complete": True})


@dataclass
class PoseCache:
    path: Path
    attrs: dict
    aliases: list[str]
    params: np.ndarray  # [S, N, 3]
    pck: np.ndarray  # [M, S, N]
    arrays: list[dict[str, np.ndarray]]  # per mentor: logits or topk_* [S, N, K, .]

    @property
    def layout(self):

        lay = self.attrs["pose"]["layout"]
        return Layout(lay["kind"], int(lay["num_joints"]), tuple(lay["dims"]))

    @property
    def slots(self) -> int:
        return int(self.attrs["views"]["num_slots"])

    @property
    def sparse(self) -> bool:
        return "logits" not in self.arrays[0]

    def gather(self, slots: torch.Tensor, idx: torch.Tensor):
        """Mentor rows of (slot, sample) pairs: float32 [M, B, K, D], or `SparseMentors`
        over the B*K joint rows (topk storage); and the keys [M, B] (float32, as stored)."""
        s, i = slots.numpy(), idx.numpy()
        keys = torch.from_numpy(self.pck[:, s, i])
        if not self.sparse:
            rows = torch.from_numpy(np.stack([a["logits"][s, i] for a in self.arrays]))
            return rows.float(), keys
        m, b = len(self.arrays), len(i)
        bk = b * self.layout.num_joints
        vals = torch.from_numpy(np.stack([a["topk_logits"][s, i] for a in self.arrays]))
        ids = torch.from_numpy(np.stack([a["topk_ids"][s, i] for a in self.arrays])
                               .astype(np.int32)).reshape(m, bk, -1)
        rest = torch.from_numpy(np.stack([a["topk_rest"][s, i] for a in self.arrays]))
        vals, rest = vals.reshape(m, bk, -1), rest.reshape(m, bk, 2)
        lse = torch.logaddexp(torch.logsumexp(vals.float(), -1), rest[..., 0])
        sm = SparseMentors(ids, vals, torch.ones_like(ids), lse, torch.zeros(m, bk),
                           rest[..., 0], rest[..., 1], ("topk",) * m, self.layout.row_size)
        return sm, keys


def old_pose_store(p: CacheLocation) -> dict | None:
    """The meta.json of a pose store of the older .npy layout at `p`, else None."""
    raw = p.get("meta.json")
    try:
        old = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return old if isinstance(old, dict) and old.get("task") == "pose" and "mentors" in old \
        else None


def rebuild_command(old: dict, out: str | Path) -> str:
    mentors = ",".join(m["checkpoint"] for m in old["mentors"])
    return (f"ckd cache-logits --prepared PREPARED_POSE_DIR --mentors {mentors} --views "
            f"{old.get('slots')} --seed {old.get('seed')} --dtype {old.get('dtype')} "
            f"--logits {old.get('storage', 'dense')} --out {out}")


def open_pose_cache(path: str | Path, ds=None) -> PoseCache:
    """Open a pose cache, every unit checked against its marker; with `ds`, check that it
    was built from that dataset."""
    p = cache_location(path)
    old = old_pose_store(p)
    if old is not None:
        raise CacheMismatchError(
            f"{p} is a pose cache of the older .npy layout, which this ckd no longer reads: "
            f"rebuild it as a Zarr cache with `{rebuild_command(old, str(p) + '-zarr')}`")
    attrs = read_root_attrs(str(p))
    if attrs.get("kind") != POSE_KIND:
        raise CacheMismatchError(f"{p} is a classification logit cache; pose students need a "
                                 "pose cache (`ckd cache-logits --prepared POSE_DIR ...`)")
    if ds is not None:
        check_compatible(attrs, dataset_name=ds.name, fingerprint=ds.meta["fingerprint"],
                         recipe=RECIPE, path=str(p))
        if attrs["pose"]["num_joints"] != ds.num_joints:
            raise CacheMismatchError(f"{p} holds {attrs['pose']['num_joints']} joints, the "
                                     f"dataset {ds.num_joints}: rebuild the cache on this "
                                     "dataset")
    found = list_mentors(p)
    aliases = [a for a in attrs["pose"]["mentors"] if a in found]
    unfinished = [a for a in aliases if not found[a].get("complete")]
    if unfinished or not aliases:
        raise CacheIncompleteError(f"{p}: mentor(s) {unfinished or 'none'} not complete; rerun "
                                   "the `ckd cache-logits --out ...` command that built it")
    root = open_root(p)
    mentors = {a: found[a] for a in aliases}
    markers = check_store(p, attrs, root, mentors)
    lay = layout_from_attrs(attrs)
    arrays = []
    for alias, m in mentors.items():
        specs = mentor_specs(m)
        columns = marker_columns(specs)
        held = {}
        for spec in specs:
            full = np.empty((lay.num_slots, lay.num_samples, *spec.suffix(lay)),
                            dtype=spec.dtype_for(lay))
            for a, b in lay.units():
                sr, sm = lay.slot_range(a), lay.sample_range(b)
                region = (slice(sr.start, sr.stop), slice(sm.start, sm.stop))
                vals = read_array(p, root, f"mentors/{alias}/{spec.name}", region,
                                  (a, b, *[0] * len(spec.suffix(lay))))
                check_unit(p, alias, lay, a, b, spec.name, vals, markers[alias], columns,
                           len(spec.suffix(lay)))
                full[region] = vals
            held[spec.name] = full
        arrays.append(held)
    params = arrays[0].pop("view_params")
    for held in arrays[1:]:
        if not np.array_equal(held.pop("view_params"), params):
            raise CacheMismatchError(f"{p}: mentors disagree on the view parameters; run "
                                     f"`ckd cache verify {p} --recompute 1`")
    pck = np.stack([held.pop("pck") for held in arrays])
    return PoseCache(p, attrs, aliases, params, pck, arrays)

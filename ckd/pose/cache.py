"""The pose logit cache: each mentor's rows of joint logits on S keyed views of every
training crop, the views' parameters and each mentor's per-view PCK (its ranking key).

A directory (every file written atomically; sha256 of each in meta.json):

    meta.json         task "pose", dataset fingerprint and joints, mentors (name, checkpoint,
                      sha256), row layout (SimCC dims or heatmap size), seed, slots S,
                      dtype, storage, view recipe, file checksums
    params.npy        float64 [S, N, 3]  (scale, rotation, flip) of view s of sample i
    pck.npy           float32 [M, S, N]  mentor m's ranking key on that view: PCK@0.05 of
                      the input size (`ckd.pose.metrics.rank_key`; NaN: no joint to score)
    rows_<m>.npy      fp16|fp32 [S, N, K, D]            dense storage (SimCC or heatmap)
    topk_<m>_ids.npy, topk_<m>_logits.npy, topk_<m>_rest.npy   `topk:k` storage (heatmaps
                      only): per joint row the k largest logits + cell ids and the rest's
                      (logsumexp, mean logit), the K+1-bucket rows of docs/SPARSE.md

View s of sample i is `ckd.pose.views.view_params(seed, i, s)`; a run seeded r replays in
epoch e the slot `ckd.data.rrc.epoch_slots(r, e, i, S)`, with or without this cache, so a
student from an fp32 cache equals the same run with the mentors evaluated online.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ckd.atomic import atomic_path, atomic_write_text
from ckd.kernels.sparse_mentors import SparseMentors, id_dtype
from ckd.pose.coco import load_pose_prepared
from ckd.pose.mentors import batch_views, load_pose_mentor
from ckd.pose.models import Layout
from ckd.pose.views import RECIPE, view_params

VERSION = 1
STORAGES = ("dense", "topk")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


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


def build_pose_cache(ds, mentor_paths: list[str], out: str | Path, *, seed: int = 0,
                     slots: int = 4, dtype: str = "fp16", storage: str = "dense",
                     batch_size: int = 256, progress: bool = True) -> Path:
    """Run every mentor over S keyed views of the training crops; write the cache."""

    if dtype not in ("fp16", "fp32"):
        raise ValueError(f"--dtype {dtype!r}: use fp16 or fp32")
    if slots < 1:
        raise ValueError(f"--views {slots}: need at least one view per sample")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mentors = [load_pose_mentor(p, ds) for p in mentor_paths]
    layouts = {m.layout for m in mentors}
    if len(layouts) != 1:
        raise ValueError(f"mentors disagree on their rows ({sorted(str(x) for x in layouts)}); "
                         "cache mentors of one head type and size together")
    layout = mentors[0].layout
    mode, k = parse_storage(storage, layout.kind)
    n = len(ds.train)
    table = view_table(seed, n, slots)
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    rows = [np.zeros((slots, n, layout.num_joints, layout.row_size if mode == "dense" else k),
                     dtype=np_dtype) for _ in mentors]
    extra: list[dict[str, np.ndarray]] = [{} for _ in mentors]
    if mode == "topk":
        ids_np = str(id_dtype(layout.row_size)).replace("torch.", "")
        for e in extra:
            e["ids"] = np.zeros((slots, n, layout.num_joints, k), dtype=ids_np)
            e["rest"] = np.zeros((slots, n, layout.num_joints, 2), dtype=np.float32)
    pck = np.zeros((len(mentors), slots, n), dtype=np.float32)
    steps = [(s, a) for s in range(slots) for a in range(0, n, batch_size)]
    for s, a in tqdm(steps, desc="cache pose views", disable=not progress, leave=False):
        idx = torch.arange(a, min(n, a + batch_size))
        x, view_kps, weight, _ = batch_views(ds, ds.train, idx, table[s, idx])
        for mi, m in enumerate(mentors):
            r, key = m.rows_and_key(x, view_kps, weight)
            pck[mi, s, idx] = key.float().numpy()
            if mode == "dense":
                rows[mi][s, idx] = r.numpy().astype(np_dtype)
            else:
                vals, ids = r.topk(k, dim=-1, sorted=True)
                rest = r.scatter(-1, ids, float("-inf"))
                rest_lse = torch.logsumexp(rest, -1) if k < r.shape[-1] else \
                    torch.full(r.shape[:2], float("-inf"))
                rest_mean = (r.double().sum(-1) - vals.double().sum(-1)).float() / max(
                    1, r.shape[-1] - k)
                rows[mi][s, idx] = vals.numpy().astype(np_dtype)
                extra[mi]["ids"][s, idx] = ids.numpy()
                extra[mi]["rest"][s, idx] = torch.stack([rest_lse, rest_mean], -1).numpy()
    files = {"params.npy": table.numpy(), "pck.npy": pck}
    for mi in range(len(mentors)):
        if mode == "dense":
            files[f"rows_{mi}.npy"] = rows[mi]
        else:
            files[f"topk_{mi}_logits.npy"] = rows[mi]
            files[f"topk_{mi}_ids.npy"] = extra[mi]["ids"]
            files[f"topk_{mi}_rest.npy"] = extra[mi]["rest"]
    for name, arr in files.items():
        _save(out / name, arr)
    meta = {"version": VERSION, "task": "pose", "dataset": ds.name,
            "fingerprint": ds.meta["fingerprint"], "num_joints": ds.num_joints,
            "input_size": list(ds.input_size),
            "mentors": [{"name": m.name, "checkpoint": str(Path(p).resolve()),
                         "sha256": _sha(Path(p))} for m, p in zip(mentors, mentor_paths,
                                                                  strict=True)],
            "layout": layout.to_dict(), "seed": int(seed), "slots": int(slots),
            "num_samples": n, "dtype": dtype, "storage": storage if mode == "topk" else "dense",
            "views": RECIPE, "rank_key": "pck@0.05-input",
            "files": {name: _sha(out / name) for name in files}}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return out


@dataclass
class PoseCache:
    path: Path
    meta: dict
    params: np.ndarray  # [S, N, 3]
    pck: np.ndarray  # [M, S, N]
    arrays: list[dict[str, np.ndarray]]  # per mentor, memory-mapped

    @property
    def layout(self):
        lay = self.meta["layout"]
        return Layout(lay["kind"], int(lay["num_joints"]), tuple(lay["dims"]))

    @property
    def slots(self) -> int:
        return int(self.meta["slots"])

    def gather(self, slots: torch.Tensor, idx: torch.Tensor):
        """Mentor rows of (slot, sample) pairs: float32 [M, B, K, D], or `SparseMentors`
        over the B*K joint rows (topk storage); and the keys [M, B] (float64)."""
        s, i = slots.numpy(), idx.numpy()
        keys = torch.from_numpy(self.pck[:, s, i].astype(np.float64))
        if self.meta["storage"] == "dense":
            rows = torch.from_numpy(np.stack([a["rows"][s, i] for a in self.arrays]))
            return rows.float(), keys
        m, b, k = len(self.arrays), len(i), self.layout.num_joints
        vals = torch.from_numpy(np.stack([a["logits"][s, i] for a in self.arrays]))
        ids = torch.from_numpy(np.stack([a["ids"][s, i] for a in self.arrays]).astype(np.int32))
        rest = torch.from_numpy(np.stack([a["rest"][s, i] for a in self.arrays]))
        vals = vals.reshape(m, b * k, -1)
        rest = rest.reshape(m, b * k, 2)
        lse = torch.logaddexp(torch.logsumexp(vals.float(), -1), rest[..., 0])
        zero = torch.zeros(m, b * k)
        sm = SparseMentors(ids.reshape(m, b * k, -1), vals, torch.ones_like(ids.reshape(
            m, b * k, -1)), lse, zero, rest[..., 0], rest[..., 1], ("topk",) * m,
            self.layout.row_size)
        return sm, keys


def open_pose_cache(path: str | Path, ds=None) -> PoseCache:
    """Open a pose cache (memory-mapped); with `ds`, check it was built from that dataset."""
    p = Path(path)
    if not (p / "meta.json").is_file():
        raise FileNotFoundError(f"{p}: no pose cache here (meta.json missing); build one with "
                                "`ckd pose cache --data DIR --mentor CKPT ... --out DIR`")
    meta = json.loads((p / "meta.json").read_text())
    if meta.get("task") != "pose":
        raise ValueError(f"{p} is a classification logit cache; pose students need a pose "
                         "cache (`ckd pose cache`)")
    if ds is not None:
        if meta["fingerprint"] != ds.meta["fingerprint"]:
            raise ValueError(f"{p} was built from dataset {meta['dataset']} (fingerprint "
                             f"{meta['fingerprint']}), not {ds.name} ({ds.meta['fingerprint']})"
                             ": rebuild the cache on this dataset")
        if meta["num_joints"] != ds.num_joints:
            raise ValueError(f"{p} holds {meta['num_joints']} joints, the dataset "
                             f"{ds.num_joints}: rebuild the cache on this dataset")
    arrays = []
    for mi in range(len(meta["mentors"])):
        if meta["storage"] == "dense":
            arrays.append({"rows": np.load(p / f"rows_{mi}.npy", mmap_mode="r")})
        else:
            arrays.append({k: np.load(p / f"topk_{mi}_{k}.npy", mmap_mode="r")
                           for k in ("logits", "ids", "rest")})
    return PoseCache(p, meta, np.load(p / "params.npy"), np.load(p / "pck.npy"), arrays)


def verify_pose_cache(path: str | Path, *, recompute: bool = False, data: str | None = None,
                      samples: int = 32) -> list[str]:
    """Problems found (empty: the cache is sound). Always: every file's sha256. With
    `recompute`: the view parameters re-derived from (seed, slot), and for `samples`
    samples per slot the mentors' rows and PCK recomputed from their checkpoints."""
    p = Path(path)
    cache = open_pose_cache(p)
    meta = cache.meta
    problems = [f"{name}: sha256 differs from meta.json (file changed or damaged)"
                for name, sha in meta["files"].items() if _sha(p / name) != sha]
    if not recompute:
        return problems
    table = view_table(meta["seed"], meta["num_samples"], meta["slots"]).numpy()
    if not np.array_equal(table, cache.params):
        bad = int((table != cache.params).any(-1).sum())
        problems.append(f"params.npy: {bad} views differ from the keyed view function")
    if data is None:
        return problems
    ds = load_pose_prepared(data)
    open_pose_cache(p, ds)
    for m in meta["mentors"]:
        if _sha(Path(m["checkpoint"])) != m["sha256"]:
            problems.append(f"mentor {m['name']}: checkpoint {m['checkpoint']} changed since "
                            "caching")
    if problems:
        return problems
    mentors = [load_pose_mentor(m["checkpoint"], ds) for m in meta["mentors"]]
    gen = torch.Generator().manual_seed(0)
    n = meta["num_samples"]
    for s in range(meta["slots"]):
        idx = torch.randperm(n, generator=gen)[:samples].sort().values
        x, kps, w, _ = batch_views(ds, ds.train, idx, torch.from_numpy(table[s, idx]))
        slot = torch.full_like(idx, s)
        rows, keys = cache.gather(slot, idx)
        for mi, mentor in enumerate(mentors):
            r, key = mentor.rows_and_key(x, kps, w)
            if not torch.allclose(key, keys[mi], equal_nan=True):
                problems.append(f"pck.npy: mentor {mi} slot {s}: recomputed PCK differs")
            if meta["storage"] == "dense":
                want = r.half().float() if meta["dtype"] == "fp16" else r
                if not torch.allclose(rows[mi], want, rtol=1e-3, atol=1e-3):
                    err = float((rows[mi] - want).abs().max())
                    problems.append(f"rows_{mi}.npy: slot {s}: recomputed rows differ (max "
                                    f"{err:.3g})")
    return problems

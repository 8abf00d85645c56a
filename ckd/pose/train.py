"""Training pose students and mentors: keyed top-down views, mentor rows from a pose cache
or from live mentors on the same views, the pose losses, AdamW with a cosine schedule,
flip-test PCK/AP evaluation.

A small pose-specific loop beside the classification trainer (whose data, cache and
kernel paths are shaped around [B, C] logits with labels): same conventions (keyed views
and slots, atomic checkpoints, a JSON-lines log, `metrics.json`).

Epoch e of a run seeded r: order `randperm` keyed by (r, e); sample i sees view
`epoch_slots(r, e, i, S)` of the view table (view seed, S slots); a cache fixes the view
seed and S, online runs take them from the config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ckd.atomic import atomic_write_text
from ckd.data.rrc import epoch_slots
from ckd.hashing import epoch_seed
from ckd.kernels.api import resolve_backend
from ckd.pose.cache import open_pose_cache, view_table
from ckd.pose.coco import PoseDataset, flip_permutation, load_pose_prepared
from ckd.pose.codec import decode, flip_rows, segments, targets
from ckd.pose.fused import fused_pose_loss
from ckd.pose.loss import POSE_DEFAULTS, POSE_METHODS, pose_loss
from ckd.pose.mentors import batch_views, load_pose_mentor, save_pose_checkpoint
from ckd.pose.metrics import (
    coco_ap,
    input_to_original,
    pck_hits,
    rank_key,
    stored_to_original,
)
from ckd.pose.models import Layout, check_bins, create_pose_model, pose_rows, probe_layout
from ckd.pose.views import view_params

DEFAULTS: dict[str, Any] = dict(
    data=None, student="resnet8-simcc", student_kwargs={}, method="nokd", params={},
    mentors=[], cache=None, epochs=10, batch_size=64, lr=2e-3, weight_decay=1e-4, seed=0,
    view_seed=0, slots=4, out=None, progress=True, eval_every=0, backend="auto")
_MASK63 = (1 << 63) - 1


@torch.no_grad()
def evaluate_pose(model: nn.Module, layout: Layout, ds: PoseDataset, batch_size: int = 256,
                  ) -> dict[str, float]:
    """Flip-test PCK@0.2 (%) and COCO AP on the un-augmented test crops."""
    was = model.training
    model.eval()
    split, n = ds.test, len(ds.test)
    perm = flip_permutation(ds.meta["joints"])
    hits = total = 0.0
    preds, scores = [], []
    for a in range(0, n, batch_size):
        idx = torch.arange(a, min(n, a + batch_size))
        params = view_params(0, idx, -1)
        x, kps, weight, norm = batch_views(ds, split, idx, params)
        rows, _ = pose_rows(model(x))
        flipped, _ = pose_rows(model(x.flip(3)))
        avg = (rows.float() + flip_rows(flipped.float(), layout, perm)) / 2
        xy, conf = decode(avg, layout, ds.input_size)
        h, t = pck_hits(xy, kps, weight, norm)
        hits, total = hits + float(h.sum()), total + float(t.sum())
        preds.append(input_to_original(xy, torch.from_numpy(split.crops[idx.numpy()]),
                                       ds.meta))
        scores.append(conf.mean(1))
    model.train(was)
    gt = stored_to_original(torch.from_numpy(split.keypoints), torch.from_numpy(split.crops),
                            ds.meta)
    ap = coco_ap(torch.cat(preds).numpy(), torch.cat(scores).numpy(), gt.numpy(),
                 split.keypoints[..., 2], split.boxes, split.areas, split.image_ids,
                 ds.meta["sigmas"])
    return {"pck": 100.0 * hits / max(total, 1.0), **{k: 100.0 * v for k, v in ap.items()}}


def _config(cfg: dict) -> dict:
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown pose training options {sorted(unknown)}; known: "
                         f"{sorted(DEFAULTS)}")
    c = {**DEFAULTS, **cfg}
    if c["method"] not in POSE_METHODS:
        raise ValueError(f"--method {c['method']!r}: pose methods are {', '.join(POSE_METHODS)}")
    if c["data"] is None:
        raise ValueError("pose training needs --data DIR (a `ckd prepare coco-keypoints` "
                         "folder)")
    if c["method"] != "nokd" and not c["mentors"] and not c["cache"]:
        raise ValueError(f"--method {c['method']} distills from mentors: pass --cache DIR "
                         "(`ckd cache-logits --prepared POSE_DIR ...`) or --mentor CKPT (online)")
    if c["mentors"] and c["cache"]:
        raise ValueError("pass either --cache or --mentor, not both")
    c["asked_backend"] = c["backend"]
    c["backend"] = resolve_backend(c["backend"], torch.device("cpu"))
    return c


def _check_cache_layout(cache_layout: Layout, student_layout: Layout, student: str) -> None:
    if cache_layout.kind != student_layout.kind:
        raise ValueError(f"the cache holds {cache_layout.kind} rows but student {student!r} "
                         f"has a {student_layout.kind} head: use a -{cache_layout.kind} "
                         f"student or cache {student_layout.kind} mentors")
    if cache_layout != student_layout:
        raise ValueError(f"cached rows {cache_layout.dims} do not match student {student!r}'s "
                         f"{student_layout.dims}: give the student the mentors' head size")


def train_pose(cfg: dict) -> dict[str, Any]:
    """Train a pose student (or mentor: method nokd); returns metrics, history, paths."""

    c = _config(cfg)
    ds = load_pose_prepared(c["data"])
    torch.manual_seed(c["seed"])
    model = create_pose_model(c["student"], ds.num_joints, ds.input_size, **c["student_kwargs"])
    layout = probe_layout(model, c["student"], ds.num_joints, ds.input_size)
    check_bins(layout, ds.input_size, f"student {c['student']!r}")
    segs = segments(layout)
    params = {**POSE_DEFAULTS[c["method"]], **c["params"]}
    loss_fn = pose_loss
    cache = mentors = None
    n = len(ds.train)
    if c["cache"]:
        cache = open_pose_cache(c["cache"], ds)
        _check_cache_layout(cache.layout, layout, c["student"])
        slots, table = cache.slots, torch.from_numpy(np.asarray(cache.params))
    else:
        mentors = [load_pose_mentor(p, ds) for p in c["mentors"]]
        for m in mentors:
            _check_cache_layout(m.layout, layout, c["student"])
        slots, table = int(c["slots"]), view_table(c["view_seed"], n, int(c["slots"]))
    # what the fused pose losses do not run (top-k rows, per-sample ranking): the reference
    # under --backend auto, refused by name under --backend triton
    unfused = ("a top-k (sparse) heatmap cache" if cache is not None and cache.sparse else
               "granularity=sample" if params.get("granularity") == "sample" else None)
    if c["backend"] == "triton" and unfused:
        if c["asked_backend"] == "triton":
            raise ValueError(f"the fused pose losses do not run {unfused}: pass --backend "
                             "reference or auto")
        c["backend"] = "reference"
    if c["backend"] == "triton" and c["method"] != "nokd":
        loss_fn = fused_pose_loss
    out = Path(c["out"]) if c["out"] else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
    steps_per_epoch = math.ceil(n / c["batch_size"])
    total_steps = steps_per_epoch * c["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    history, losses = [], []
    step = 0
    for epoch in range(c["epochs"]):
        model.train()
        gen = torch.Generator().manual_seed(epoch_seed(c["seed"], epoch) & _MASK63)
        order = torch.randperm(n, generator=gen)
        slot_of = epoch_slots(c["seed"], epoch, torch.arange(n), slots)
        sums = torch.zeros(2, dtype=torch.float64)
        for a in tqdm(range(0, n, c["batch_size"]), desc=f"epoch {epoch + 1}/{c['epochs']}",
                      disable=not c["progress"], leave=False):
            idx = order[a:a + c["batch_size"]]
            s = slot_of[idx]
            x, kps, weight, _ = batch_views(ds, ds.train, idx, table[s, idx])
            target, _ = targets(kps, layout, ds.input_size)
            zs, _ = pose_rows(model(x))
            kw = {}
            mrows = None
            if c["method"] != "nokd":
                if cache is not None:
                    mrows, mkeys = cache.gather(s, idx)
                else:
                    got = [m.rows_and_key(x, kps, weight) for m in mentors]
                    mrows = torch.stack([g[0] for g in got])
                    mkeys = torch.stack([g[1] for g in got])
                if c["method"] == "classroom":
                    kw = {"student_key": rank_key(zs.detach(), layout, ds.input_size, kps,
                                                  weight), "mentor_keys": mkeys}
            loss, stats = loss_fn(c["method"], zs, mrows, target, weight, segs, **kw,
                                  **params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            sums += torch.tensor([float(loss.detach()) * len(idx), len(idx)],
                                 dtype=torch.float64)
        rec = {"epoch": epoch, "step": step, "train_loss": float(sums[0] / sums[1]),
               "mentor_active": stats["mentor_active"].tolist()}
        last = epoch + 1 == c["epochs"]
        if last or (c["eval_every"] and (epoch + 1) % c["eval_every"] == 0):
            rec.update(evaluate_pose(model, layout, ds))
        history.append(rec)
        if c["progress"]:
            tqdm.write(f"epoch {epoch + 1}/{c['epochs']} loss {rec['train_loss']:.4f}"
                       + (f" PCK {rec['pck']:.2f} AP {rec['AP']:.2f}" if "pck" in rec else ""))
        if out:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
    final = history[-1]
    metrics = {k: final[k] for k in ("pck", "AP", "AP50", "AP75", "AR")}
    result = {"metrics": metrics, "history": history, "losses": losses, "model": model,
              "backend": c["backend"],
              "layout": layout, "method": c["method"], "student": c["student"]}
    if out:
        save_pose_checkpoint(out / "student.pt", model, c["student"], c["student_kwargs"], ds,
                             layout, metrics)
        atomic_write_text(out / "metrics.json", json.dumps(
            {**metrics, "method": c["method"], "student": c["student"], "seed": c["seed"],
             "mentors": c["mentors"], "cache": c["cache"], "epochs": c["epochs"],
             "backend": c["backend"]},
            indent=2) + "\n")
        result["checkpoint"] = str(out / "student.pt")
    return result

"""`ckd demo --pose`: the pose pipeline end to end on the synthetic keypoint set.

prepare the synthetic COCO-format set -> train pose mentors (SimCC heads) -> cache their
rows over S keyed views -> students (nokd, kd, aver, classroom) x seeds from the cache ->
a PCK@0.2 / AP table (mean +- std over seeds), a plot and results.json in `out/report`.
Sizes are chosen to fit in about 15 minutes on 2 CPU cores (one torch thread).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckd.atomic import atomic_write_text
from ckd.pose.cache import build_pose_cache
from ckd.pose.coco import load_pose_prepared, prepare_coco_keypoints
from ckd.pose.synthetic import make_synthetic_coco
from ckd.pose.train import train_pose

METHOD_LABELS = {"nokd": "NOKD", "kd": "KD (teacher)", "aver": "AVER",
                 "classroom": "ClassroomKD"}


@dataclass
class PoseDemoPlan:
    train_images: int = 700
    val_images: int = 150
    input_size: tuple[int, int] = (64, 48)
    # (name, architecture, epochs, seed): the first is the teacher
    mentors: tuple[tuple[str, str, int, int], ...] = (
        ("teacher", "resnet20-simcc", 6, 11), ("peer-r14", "resnet14-simcc", 3, 12),
        ("peer-r8", "resnet8-simcc", 2, 13))
    student: str = "resnet8-simcc"
    methods: tuple[str, ...] = ("nokd", "kd", "aver", "classroom")
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 4
    views: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    params: dict = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[pose demo] {msg}", flush=True)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plot_pose(results: dict, path: Path) -> Path:
    import matplotlib  # noqa: PLC0415 - plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional heavy dependency (matplotlib)

    methods = list(results["students"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, name in ((axes[0], "pck", "PCK@0.2 (%)"), (axes[1], "AP", "COCO AP (%)")):
        vals = [[r[key] for r in results["students"][m]] for m in methods]
        means = [statistics.mean(v) for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(range(len(methods)), means, yerr=errs, capsize=4, color="#4c72b0")
        for mk, m in enumerate(results["mentors"]):
            ax.axhline(m[key], ls="--", lw=1, color=f"C{mk + 1}", label=m["name"])
        ax.set_xticks(range(len(methods)), [METHOD_LABELS[m] for m in methods], rotation=15)
        lo = min(min(means), *(m[key] for m in results["mentors"]))
        ax.set_ylim(max(0.0, lo - 10), None)
        ax.set_title(name)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"student {results['student']}, {len(results['seeds'])} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_pose_demo(out: str | Path = "demo_pose", plan: PoseDemoPlan | None = None,
                  progress: bool = False) -> dict:
    """Every stage on one torch thread (its digits depend on the count); the caller's
    thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_pose_demo(out, plan, progress)
    finally:
        torch.set_num_threads(threads)


def _run_pose_demo(out: str | Path, plan: PoseDemoPlan | None, progress: bool) -> dict:
    plan = plan or PoseDemoPlan()
    out = Path(out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    _say(f"1/4 synthetic keypoint set ({plan.train_images} + {plan.val_images} images)")
    make_synthetic_coco(out / "coco", seed=0, n_train_images=plan.train_images,
                        n_val_images=plan.val_images)
    meta = prepare_coco_keypoints(out / "coco", out / "prepared", input_size=plan.input_size,
                                  name="synthetic-keypoints", progress=progress)
    data = str(out / "prepared")
    _say(f"    {meta['n_train']} train / {meta['n_test']} test person crops, "
         f"{meta['num_joints']} joints, input {plan.input_size[0]}x{plan.input_size[1]}")
    timings["prepare"] = time.perf_counter() - t0
    mentor_rows, paths = [], []
    for name, arch, epochs, seed in plan.mentors:
        t = time.perf_counter()
        res = train_pose(dict(data=data, student=arch, epochs=epochs, seed=seed,
                              batch_size=plan.batch_size, lr=plan.lr, progress=progress,
                              out=str(out / "mentors" / name)))
        paths.append(res["checkpoint"])
        mentor_rows.append({"name": name, "arch": arch, "epochs": epochs, **res["metrics"]})
        _say(f"2/4 mentor {name} ({arch}, {epochs} epochs): PCK {res['metrics']['pck']:.2f} "
             f"AP {res['metrics']['AP']:.2f} ({time.perf_counter() - t:.0f} s)")
    timings["mentors"] = time.perf_counter() - t0 - timings["prepare"]
    t = time.perf_counter()
    ds = load_pose_prepared(data)
    cache = build_pose_cache(ds, paths, out / "cache", seed=0, slots=plan.views,
                             dtype="fp16", batch_size=256, progress=progress)
    timings["cache"] = time.perf_counter() - t
    _say(f"3/4 cached SimCC rows of {len(paths)} mentors x {plan.views} views "
         f"({timings['cache']:.0f} s)")
    students: dict[str, list[dict]] = {m: [] for m in plan.methods}
    t = time.perf_counter()
    for method in plan.methods:
        for seed in plan.seeds:
            res = train_pose(dict(data=data, student=plan.student, method=method,
                                  params=dict(plan.params.get(method, {})),
                                  cache=None if method == "nokd" else str(cache),
                                  epochs=plan.epochs, seed=seed, batch_size=plan.batch_size,
                                  lr=plan.lr, progress=progress,
                                  out=str(out / "runs" / f"{method}-s{seed}")))
            students[method].append(res["metrics"])
        vals = students[method]
        _say(f"4/4 {METHOD_LABELS[method]}: PCK {_mean_std([v['pck'] for v in vals])} "
             f"AP {_mean_std([v['AP'] for v in vals])}")
    timings["students"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    results = {"student": plan.student, "epochs": plan.epochs, "views": plan.views,
               "seeds": list(plan.seeds), "mentors": mentor_rows, "students": students,
               "timings_s": timings}
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    table = pose_table(results)
    atomic_write_text(report / "table.md", table + "\n")
    atomic_write_text(report / "results.json", json.dumps(results, indent=2) + "\n")
    plot = plot_pose(results, report / "pose.png")
    print(table, flush=True)
    _say(f"total {timings['total']:.0f} s; wrote {report / 'table.md'}, {plot}, "
         f"{report / 'results.json'}")
    return results


def pose_table(results: dict) -> str:
    lines = ["| model | method | PCK@0.2 (%) | AP (%) |", "|---|---|---|---|"]
    for m in results["mentors"]:
        lines.append(f"| {m['arch']} ({m['name']}) | trained alone, {m['epochs']} epochs | "
                     f"{m['pck']:.2f} | {m['AP']:.2f} |")
    for method, runs in results["students"].items():
        lines.append(f"| {results['student']} | {METHOD_LABELS[method]} | "
                     f"{_mean_std([r['pck'] for r in runs])} | "
                     f"{_mean_std([r['AP'] for r in runs])} |")
    return "\n".join(lines)

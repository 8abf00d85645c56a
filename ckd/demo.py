"""`ckd demo`: the whole pipeline on the bundled digits data, offline, on the CPU.

prepare -> train a classroom of mentors -> cache every view's logits -> train the student
with nokd, kd, aver and classroom (both variants) over several seeds -> results table and
plots. Sizes are chosen so the run fits in about 10 minutes on 2 cores and the task is not
saturated (see README, "The demo"). `DemoPlan.with_features()` (`ckd demo --features`)
also caches the mentors' pooled features and trains the feature methods (fitnet, crd,
tekap (F), tekap (F+L), sdkd) next to nokd, kd and classroom.

Every stage is deterministic for a given torch build, torch thread count (`threads`, 1 by
default, pinned for the whole demo) and CPU instruction set; the table's first line names
the three. Rerunning the demo into the same folder reuses what the earlier run finished
(mentors, cache, student runs: resumed, or kept when complete) and prints the same table.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckd.atomic import atomic_write_text
from ckd.cache import build_cache
from ckd.data.beton import write_betons
from ckd.data.datasets import load_dataset
from ckd.models import read_checkpoint_meta, resolve_arch
from ckd.train import train, train_mentor
from ckd.train.report import load_run, write_report

# (label, method, classroom variant): the rows of the results table.
DEMO_METHODS: tuple[tuple[str, str, str | None], ...] = (
    ("nokd", "nokd", None),
    ("kd", "kd", None),
    ("aver", "aver", None),
    ("classroom (paper)", "classroom", "paper"),
    ("classroom (official)", "classroom", "official"),
)
# Rows for the students beyond CNNs (`ckd demo --students`): kd and classroom from the
# same cache as the main student.
MORE_STUDENT_METHODS: tuple[tuple[str, str, str | None], ...] = (
    ("kd", "kd", None),
    ("classroom (official)", "classroom", "official"),
)
# `ckd demo --features`: the feature-level methods next to kd and classroom, with the
# weights their papers' CIFAR recipes use (RepDistiller: CE + 0.8 CRD; TeKAP F+L: the
# logit-level tekap plus the feature level at the CRD weight).
FEATURE_DEMO_METHODS: tuple[tuple[str, str, str | None], ...] = (
    ("nokd", "nokd", None),
    ("kd", "kd", None),
    ("classroom (paper)", "classroom", "paper"),
    ("fitnet", "fitnet", None),
    ("crd", "0.8*crd", None),
    ("tekap (F)", "0.8*tekap-f", None),
    ("tekap (F+L)", "tekap+0.8*tekap-f", None),
    ("sdkd", "sdkd", None),
)
# CRD/TeKAP (F) on 1,347 digits: 1,024 negatives a sample instead of RepDistiller's 16,384
# (CIFAR's 50,000 samples), which would make every CPU step gather 2 x 64 x 16,385 rows.
FEATURE_DEMO_PARAMS = {"crd.nce_k": 1024, "tekap-f.nce_k": 1024}


@dataclass
class DemoPlan:
    image_size: int = 16  # digits upscaled 2x: a quarter of the 32x32 compute
    teacher: str = "r20"
    peers: tuple[str, ...] = ("r14", "wrn-16-1", "r8")
    student: str = "r8"
    mentor_epochs: int = 30
    student_epochs: int = 15
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 64
    lr: float | None = None  # None: 0.05, or 0.01 for MobileNet/ShuffleNet (paper)
    tau: float = 4.0
    methods: tuple[tuple[str, str, str | None], ...] = DEMO_METHODS
    more_students: tuple[str, ...] = ()  # e.g. ("mamba_tiny", "vit_tiny"): `--students`
    more_methods: tuple[tuple[str, str, str | None], ...] = MORE_STUDENT_METHODS
    cache_views: int | str = "all"  # the demo caches every view; tests may cache fewer
    features: tuple[str, ...] = ()  # mentor features cached beside the logits ("pool")
    method_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"crd.nce_k": 1024}
    threads: int = 1  # torch threads: other counts sum in other orders (other last digits)
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str, str, str | None]]:
        """(table label, student, method, variant) for every row of the results table."""
        rows = [(label, self.student, m, v) for label, m, v in self.methods]
        rows += [(f"{s} {label}", s, m, v) for s in self.more_students
                 for label, m, v in self.more_methods]
        return rows

    @classmethod
    def with_features(cls, **kw: Any) -> DemoPlan:
        """The `--features` demo: feature methods beside kd and classroom."""
        return cls(**{"methods": FEATURE_DEMO_METHODS, "features": ("pool",),
                      "method_params": dict(FEATURE_DEMO_PARAMS), **kw})


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def plot_methods(runs_by_method: dict[str, list[str]], path: Path) -> Path:
    """Test top-1 per epoch, mean over seeds with a +-1 std band, one line per method."""
    import matplotlib  # noqa: PLC0415 - heavy import, plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional heavy dependency (matplotlib)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, dirs in runs_by_method.items():
        curves = [[e["test_acc"] for e in load_run(d)["epochs"]] for d in dirs]
        n = min(len(c) for c in curves)
        acc = np.array([c[:n] for c in curves], dtype=float)
        x = np.arange(1, n + 1)
        mean, sd = acc.mean(0), acc.std(0)
        ax.plot(x, mean, marker="o", label=f"{label} ({mean[-1]:.1f}%)")
        ax.fill_between(x, mean - sd, mean + sd, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), mean +- std over seeds")
    ax.set_title("Student accuracy by method")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def numerics(threads: int | None = None) -> str:
    """What the demo's digits depend on: torch's version, thread count (default: the
    current one), CPU kernels."""
    n = threads or torch.get_num_threads()
    return (f"torch {torch.__version__}, {n} thread{'s' if n > 1 else ''}, CPU "
            f"{torch.backends.cpu.get_cpu_capability()}")


def _mentor_reused(path: Path, epochs: int) -> float | None:
    """The test top-1 of a mentor an earlier demo run wrote at `path`, or None if there is
    none; a mentor trained with other epochs is refused (another plan's folder)."""
    if not path.is_file():
        return None
    metrics = read_checkpoint_meta(path).get("metrics") or {}
    if metrics.get("epochs") != epochs or "test_acc" not in metrics:
        raise FileExistsError(f"{path} holds a mentor from another demo plan "
                              f"({metrics.get('epochs')} epochs, this one trains {epochs}): use "
                              f"another --out, or delete {path.parent.parent.parent} to run "
                              "the demo again")
    return float(metrics["test_acc"])


def _earlier_times(out: Path) -> dict[tuple[str, int], float]:
    """(row label, seed) -> seconds of the run as the earlier demo run into `out` timed it."""
    try:
        results = json.loads((out / "results.json").read_text())["results"]
        return {(label, int(r["seed"])): float(r["time_s"])
                for label, rs in results.items() for r in rs}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_demo(out: str | Path = "demo_out", plan: DemoPlan | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Run every stage into `out`; returns the results (also written to results.json/md).
    Stages an earlier run into `out` finished are reused, interrupted ones resumed."""
    plan = plan or DemoPlan()
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        return _run_demo(Path(out), plan, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, plan: DemoPlan, progress: bool) -> dict[str, Any]:
    earlier = _earlier_times(out)
    mark = out / "numerics.txt"  # what the runs in `out` were computed with
    if mark.is_file() and mark.read_text().strip() != numerics():
        raise FileExistsError(f"{out} holds a demo run made with {mark.read_text().strip()}, "
                              f"this one would use {numerics()} (other digits): use another "
                              f"--out, the same --threads, or delete {out}")
    if (out / "runs").is_dir():
        _say(f"{out} holds an earlier demo run: its finished stages are reused (delete "
             f"{out} to run everything again)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mark, numerics() + "\n")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage_done(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        _say(f"{name}: {timings[name]:.1f} s")

    # 1. data ------------------------------------------------------------------------
    t0 = time.perf_counter()
    ds = load_dataset("digits", image_size=plan.image_size)
    prepared = write_betons(ds, out / "data")
    _say(f"digits {plan.image_size}x{plan.image_size}: {len(ds.train.labels)} train / "
         f"{len(ds.test.labels)} test, fingerprint {ds.fingerprint} -> {prepared}")
    stage_done("prepare", t0)
    common = dict(prepared=str(prepared), batch_size=plan.batch_size, lr=plan.lr,
                  device="cpu", progress=progress, log_every=10, **plan.extra)

    # 2. mentors ----------------------------------------------------------------------
    t0 = time.perf_counter()
    mentor_dir = out / "mentors"
    mentors: dict[str, Path] = {}
    mentor_acc: dict[str, float] = {}
    for alias in (plan.teacher, *plan.peers):
        path = mentor_dir / ds.name / f"{resolve_arch(alias)}.pt"
        acc = _mentor_reused(path, plan.mentor_epochs)
        if acc is None:  # (a run killed before its mentor was written resumes)
            r = train_mentor(alias, None, out=out / "runs" / f"mentor-{alias}",
                             mentor_dir=mentor_dir, epochs=plan.mentor_epochs, seed=0,
                             resume=True, **common)
            path, acc = Path(r["mentor_path"]), r["last_acc"]
        mentors[alias], mentor_acc[alias] = path, acc
        _say(f"mentor {alias}: test top-1 {acc:.2f}%")
    stage_done("train mentors", t0)

    # 3. cache every view -------------------------------------------------------------
    t0 = time.perf_counter()
    cache = build_cache(ds, {a: str(p) for a, p in mentors.items()}, out / "cache",
                        views=plan.cache_views, device="cpu", dtype="fp16", progress=progress,
                        features=plan.features)
    what = "all 162 views" if plan.cache_views == "all" else f"{plan.cache_views} views"
    stage_done(f"cache-logits ({what}"
               + (f", features {','.join(plan.features)})" if plan.features else ")"), t0)

    # 4. students ---------------------------------------------------------------------
    t0 = time.perf_counter()
    rows = plan.rows()
    results: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in rows}
    runs_by_method: dict[str, list[str]] = {label: [] for label, *_ in rows}
    for label, student, method, variant in rows:
        for seed in plan.seeds:
            name = f"{label.replace(' ', '').replace('(', '-').replace(')', '')}-s{seed}"
            params = {k: v for k, v in plan.method_params.items()
                      if k.split(".")[0] in method.replace("*", "+").split("+")}
            cfg = dict(common, student=student, method=method, variant=variant,
                       method_params=params,
                       epochs=plan.student_epochs, seed=seed, out=str(out / "runs" / name),
                       cache=None if method == "nokd" else str(cache),
                       mentors=None if method == "nokd" else [plan.teacher, *plan.peers],
                       tau=plan.tau if method in ("aver", "classroom") else None)
            t_run = time.perf_counter()
            done = (out / "runs" / name / "student.pt").is_file()
            r = train(dict(cfg, resume=True))  # a finished run returns its results at once
            took = time.perf_counter() - t_run
            if done:  # the time of the run that trained it, when recorded
                took = earlier.get((label, seed), took)
            results[label].append({"seed": seed, "best": r["best_acc"], "last": r["last_acc"],
                                   "time_s": took})
            runs_by_method[label].append(r["run_dir"])
            who = label if label.startswith(student) else f"{student} {label}"
            _say(f"student {who} seed {seed}: last {r['last_acc']:.2f}% "
                 f"best {r['best_acc']:.2f}%")
    stage_done("train students", t0)

    # 5. table + plots ----------------------------------------------------------------
    more = f" (and {', '.join(plan.more_students)})" if plan.more_students else ""
    lines = [f"Student {plan.student}{more} on digits {plan.image_size}x{plan.image_size}, "
             f"{plan.student_epochs} epochs, seeds {list(plan.seeds)}; mentors (test top-1): "
             + ", ".join(f"{a} {acc:.2f}%" for a, acc in mentor_acc.items())
             + f" (teacher {plan.teacher}); {numerics()}", "",
             "| method | last top-1 (mean +- std) | best top-1 (mean +- std) | s per run |",
             "|---|---|---|---|"]
    for label, rs in results.items():
        lines.append(f"| {label} | {_mean_std([r['last'] for r in rs])} | "
                     f"{_mean_std([r['best'] for r in rs])} | "
                     f"{statistics.mean(r['time_s'] for r in rs):.1f} |")
    table = "\n".join(lines)
    plots = write_report([d for ds_ in runs_by_method.values() for d in ds_], out / "report")
    plots["methods"] = plot_methods(runs_by_method, out / "report" / "methods.png")
    timings["total"] = time.perf_counter() - t_start
    summary = {"plan": asdict(plan), "mentor_acc": mentor_acc, "results": results,
               "timings_s": timings, "plots": {k: str(v) for k, v in plots.items()}}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", table + "\n")
    print("\n" + table + "\n", flush=True)
    _say(f"plots: {', '.join(str(p) for p in plots.values())}")
    _say(f"total {timings['total']:.0f} s; results in {out / 'results.md'}")
    return summary

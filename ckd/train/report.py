"""`ckd report`: PNG plots and a markdown table from run folders' metrics.jsonl.

- accuracy.png: test (solid) and train (dashed) top-1 per epoch, every run on one plot;
- ranks.png: each classroom run's per-mentor rank r_m against the student's rank r_s over
  training (the paper's Fig. 6), one panel per run;
- temperatures.png: each mentor's mentoring temperature tau_m (Fig. 5), one panel per run;
- report.md: best / last top-1 per run, and the plots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckd.atomic import atomic_write_text
from ckd.train.metrics import read_metrics


def load_run(run_dir: str | Path) -> dict[str, Any]:
    recs = read_metrics(run_dir)
    head = next((r for r in recs if r.get("type") == "run"), {})
    epochs = [r for r in recs if r.get("type") == "epoch"]
    steps = [r for r in recs if r.get("type") == "step"]
    name = Path(run_dir).resolve().name
    return {"name": name, "dir": str(run_dir), "head": head, "epochs": epochs, "steps": steps}


def _acc(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def summary_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | method | student | mentors | epochs | best top-1 (%) | last top-1 (%) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        h, ep = r["head"], r["epochs"]
        best = max((_acc(e.get("test_acc")) for e in ep), default=float("nan"))
        last = _acc(ep[-1].get("test_acc")) if ep else float("nan")
        mentors = ", ".join(h.get("mentors") or []) or "-"
        lines.append(f"| {r['name']} | {h.get('method', '?')} | {h.get('student', '?')} | "
                     f"{mentors} | {len(ep)}/{h.get('epochs', '?')} | {best:.2f} | {last:.2f} |")
    return "\n".join(lines) + "\n"


def _steps_with(run: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [s for s in run["steps"] if isinstance(s.get(key), list) and s[key]]


def _x(steps: list[dict[str, Any]], per_epoch: dict[int, int]) -> list[float]:
    """Fractional epoch of each step record (x axis comparable across batch sizes)."""
    default = max(per_epoch.values(), default=0) or max(s["step"] for s in steps)
    out = []
    for s in steps:
        e = s["epoch"]
        done = sum(n for k, n in per_epoch.items() if k < e)  # steps before epoch e
        out.append(e + (s["step"] - done) / (per_epoch.get(e) or default))
    return out


def _per_epoch_steps(run: dict[str, Any]) -> dict[int, int]:
    counts: dict[int, int] = {}
    prev = 0
    for e in run["epochs"]:
        counts[e["epoch"]] = e["step"] - prev
        prev = e["step"]
    return counts


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write the PNGs and report.md into `out_dir`; returns {name: path}."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib  # noqa: PLC0415 - heavy import, report only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional heavy dependency (matplotlib)

    if not run_dirs:
        raise ValueError("give at least one run folder (written by `ckd train`)")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(runs):
        ep = r["epochs"]
        if not ep:
            continue
        color = f"C{i % 10}"
        xs = [e["epoch"] + 1 for e in ep]
        ax.plot(xs, [_acc(e["test_acc"]) for e in ep], color=color, lw=2,
                label=f"{r['name']} test")
        ax.plot(xs, [_acc(e["train_acc"]) for e in ep], color=color, lw=1, ls="--",
                label=f"{r['name']} train")
    ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written["accuracy"] = out / "accuracy.png"
    fig.savefig(written["accuracy"], dpi=110)
    plt.close(fig)

    for key, fname, ylabel, title in (
            ("mentor_rank", "ranks.png", "rank", "Mentor ranks vs student rank (Fig. 6)"),
            ("mentor_temp", "temperatures.png", "temperature tau_m",
             "Mentoring temperatures (Fig. 5)")):
        panels = [r for r in runs if r["head"].get("method") == "classroom"
                  and _steps_with(r, key)]
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.6 * len(panels)),
                                 squeeze=False)
        for ax, r in zip(axes[:, 0], panels, strict=True):
            steps = _steps_with(r, key)
            xs = _x(steps, _per_epoch_steps(r))
            names = r["head"].get("mentors") or []
            m = len(steps[0][key])
            for j in range(m):
                label = names[j] if j < len(names) else f"mentor {j}"
                if j == 0:
                    label += " (teacher)"
                ax.plot(xs, [s[key][j] for s in steps], lw=1.2, label=label)
            if key == "mentor_rank":
                ax.plot(xs, [_acc(s.get("student_rank")) for s in steps], color="black",
                        lw=2.2, label="student")
            ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title}: {r['name']}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        written[key] = out / fname
        fig.savefig(written[key], dpi=110)
        plt.close(fig)

    md = ["# ckd report", "", summary_table(runs)]
    for key in ("accuracy", "mentor_rank", "mentor_temp"):
        if key in written:
            md.append(f"![{key}]({written[key].name})\n")
    written["report"] = out / "report.md"
    atomic_write_text(written["report"], "\n".join(md))
    return written

"""Student accuracy from dense, topk:K and sample:S caches of the same mentors.

    .venv/bin/python scripts/sparse_accuracy.py digits    [--out DIR] [--seeds 0,1,2]

Trains the mentors once (nokd), caches their logits three times (`--logits dense`,
`topk:K`, `sample:S`; keyed views, one per student epoch), then trains kd and classroom
students from each cache over the seeds and prints the table (last / best test top-1, mean
+- std). digits: 10 classes, K=2, S=4. Everything runs on the CPU; sizes are small because
the 2 cores are shared. The 100-class task where sparsity bites is
scripts/sparse_synthetic.py (points and MLPs: CNNs on 100-class images do not fit the
shared CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

TASKS = {
    "digits": dict(dataset="digits", options={"image_size": 8}, teacher="r14",
                   peers=("r8",), student="r8", mentor_epochs=10, student_epochs=8,
                   modes=("dense", "topk:2", "sample:4"), tau=4.0),
}
METHODS = (("kd", "kd", None), ("classroom", "classroom", "paper"))  # variant: classroom only


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    from ckd.cache import build_cache
    from ckd.data import load_dataset
    from ckd.train import train, train_mentor

    task = TASKS[args.task]
    out = args.out or Path(f"sparse_accuracy_{args.task}")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    ds = load_dataset(task["dataset"], **task["options"])
    common = dict(dataset_options=task["options"], batch_size=64, device="cpu",
                  progress=False, log_every=50)
    mentors, acc = {}, {}
    for alias in (task["teacher"], *task["peers"]):
        r = train_mentor(alias, task["dataset"], out=out / "runs" / f"mentor-{alias}",
                         mentor_dir=out / "mentors", epochs=task["mentor_epochs"], seed=0,
                         **common)
        mentors[alias], acc[alias] = r["mentor_path"], r["last_acc"]
        print(f"mentor {alias}: test top-1 {r['last_acc']:.2f}%", flush=True)
    caches = {}
    for mode in task["modes"]:
        caches[mode] = build_cache(ds, mentors, out / f"cache-{mode.replace(':', '')}",
                                   views=task["student_epochs"], logits=mode, progress=False)
    print(f"mentors and caches: {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for label, method, variant in METHODS:
        for mode in task["modes"]:
            for seed in seeds:
                r = train(dict(common, dataset=task["dataset"], student=task["student"],
                               method=method, variant=variant, seed=seed,
                               epochs=task["student_epochs"], cache=str(caches[mode]),
                               tau=task["tau"] if method == "classroom" else None,
                               mentors=[task["teacher"], *task["peers"]],
                               out=str(out / "runs" / f"{label}-{mode.replace(':', '')}-s{seed}")))
                results.setdefault((label, mode), []).append((r["last_acc"], r["best_acc"]))
                print(f"{label} from {mode} seed {seed}: last {r['last_acc']:.2f}% best "
                      f"{r['best_acc']:.2f}%", flush=True)
    lines = [f"Student {task['student']} on {args.task} ({ds.num_classes} classes), "
             f"{task['student_epochs']} epochs, seeds {seeds}, tau {task['tau']}; mentors "
             "(test top-1): " + ", ".join(f"{a} {v:.2f}%" for a, v in acc.items())
             + f"; total {time.perf_counter() - t0:.0f} s", "",
             "| method | mentor logits | last top-1 | best top-1 |", "|---|---|---|---|"]
    for (label, mode), rows in results.items():
        lines.append(f"| {label} | {mode} | {_mean_std([r[0] for r in rows])} | "
                     f"{_mean_std([r[1] for r in rows])} |")
    print("\n" + "\n".join(lines), flush=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

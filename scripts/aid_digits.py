"""AID evidence on the bundled digits (CPU, a few minutes): original vs adapted teacher.

prepare digits 16x16 -> mentors (teacher r20, peers r14 and r8) -> `adapt-mentor` the
teacher for an r8 student -> one cache with both teachers and the peers -> r8 students with
kd and classroom from the original vs the adapted teacher, 3 seeds -> the KD-loss
decomposition (inter / intra) of the seed-0 kd students against their teacher -> a table.

    .venv/bin/python scripts/aid_digits.py --out aid_out

Rerunning the same command resumes: finished mentors, the adapted teacher, the cache and
finished student runs are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="aid_out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--mentor-epochs", type=int, default=30)
    ap.add_argument("--student-epochs", type=int, default=15)
    ap.add_argument("--views", type=int, help="cached views (default: --student-epochs)")
    ap.add_argument("--adapt-epochs", type=int, default=5)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--anchor", type=float, default=1.0)
    args = ap.parse_args()

    from ckd.aid.adapt import adapt_mentor
    from ckd.aid.analyze import decompose_over_train
    from ckd.cache import build_cache
    from ckd.data.beton import write_betons
    from ckd.data.datasets import load_dataset
    from ckd.models import read_checkpoint_meta, resolve_arch
    from ckd.train import train, train_mentor

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    ds = load_dataset("digits", image_size=16)
    prepared = write_betons(ds, out / "data")
    common = dict(prepared=str(prepared), batch_size=64, device="cpu", progress=False,
                  log_every=10)

    t0 = time.perf_counter()
    mentors, acc = {}, {}
    for alias in ("r20", "r14", "r8"):
        done = out / "mentors" / "digits" / f"{resolve_arch(alias)}.pt"
        if done.is_file():  # resumed: keep the finished mentor
            mentors[alias] = str(done)
            acc[alias] = read_checkpoint_meta(done)["metrics"]["test_acc"]
            continue
        r = train_mentor(alias, None, out=out / "runs" / f"mentor-{alias}",
                         mentor_dir=out / "mentors", epochs=args.mentor_epochs, seed=0,
                         **common)
        mentors[alias], acc[alias] = r["mentor_path"], r["last_acc"]
        print(f"[aid] mentor {alias}: {r['last_acc']:.2f}%", flush=True)
    times["mentors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    aid_path = out / "mentors" / "digits" / "resnet20-aid-r8.pt"
    if aid_path.is_file():
        res = read_checkpoint_meta(aid_path)["metrics"]
    else:
        res = adapt_mentor("r20", mentors["r20"], "r8", aid_path, prepared=str(prepared),
                           epochs=args.adapt_epochs, lam=args.lam, anchor=args.anchor,
                           progress=False)
    acc["r20aid"] = res["test_acc"]
    times["adapt-mentor"] = time.perf_counter() - t0
    print(f"[aid] adapted teacher: {res['source_test_acc']:.2f}% -> {res['test_acc']:.2f}%",
          flush=True)

    t0 = time.perf_counter()
    # one keyed view per student epoch: exactly the views an online run would see
    cache = build_cache(ds, {**mentors, "r20aid": str(aid_path)}, out / "cache",
                        views=args.views or args.student_epochs, device="cpu",
                        progress=False)
    times["cache"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    for teacher in ("r20", "r20aid"):
        for method in ("kd", "classroom"):
            key = f"{method} from {'adapted' if teacher == 'r20aid' else 'original'} teacher"
            rows[key] = []
            for seed in range(args.seeds):
                run = out / "runs" / f"{method}-{teacher}-s{seed}"
                if (run / "student.pt").is_file():  # resumed: a finished run
                    m = read_checkpoint_meta(run / "student.pt")["metrics"]
                    rows[key].append({"seed": seed, "last": m["test_acc"],
                                      "best": m["best_acc"], "run": str(run)})
                    continue
                r = train(dict(common, student="r8", method=method, seed=seed,
                               epochs=args.student_epochs, cache=str(cache), out=str(run),
                               mentors=[teacher] if method == "kd" else [teacher, "r14", "r8"],
                               tau=4.0 if method == "classroom" else None))
                rows[key].append({"seed": seed, "last": r["last_acc"], "best": r["best_acc"],
                                  "run": str(run)})
                print(f"[aid] {key} seed {seed}: {r['last_acc']:.2f}%", flush=True)
    times["students"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from ckd.models import load_checkpoint

    decomp = {}
    for teacher, key in (("r20", "kd from original teacher"),
                         ("r20aid", "kd from adapted teacher")):
        student = load_checkpoint(Path(rows[key][0]["run"]) / "student.pt")
        decomp[teacher] = decompose_over_train(cache, teacher, student, ds, T=4.0)[-1]
    times["analyze"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all

    lines = [
        f"Teacher r20 adapted for an r8 student (lam {args.lam}, anchor {args.anchor}, "
        f"{args.adapt_epochs} + {args.adapt_epochs} epochs); digits 16x16, students r8, "
        f"{args.student_epochs} epochs, seeds 0..{args.seeds - 1}; peers r14 "
        f"({acc['r14']:.2f}%), r8 ({acc['r8']:.2f}%).", "",
        "| teacher | test top-1 | KD loss (train, vs its seed-0 kd student) | inter-class | "
        "intra-class | teacher intra spread |", "|---|---|---|---|---|---|"]
    for t, name in (("r20", "original r20"), ("r20aid", "adapted r20")):
        d = decomp[t]
        lines.append(f"| {name} | {acc[t]:.2f} | {d['kd']:.4f} | {d['inter']:.4f} | "
                     f"{d['intra']:.4f} | {d['mentor_spread']:.4f} |")
    lines += ["", "| student r8 | last top-1 (mean +- std) | best top-1 (mean +- std) |",
              "|---|---|---|"]
    for key, rs in rows.items():
        lines.append(f"| {key} | {_ms([r['last'] for r in rs])} | "
                     f"{_ms([r['best'] for r in rs])} |")
    lines += ["", "time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"acc": acc, "decomposition": decomp, "students": rows, "times_s": times,
         "adapt": {k: v for k, v in res.items() if k != "model"}}, indent=2))
    print("\n" + table, flush=True)


if __name__ == "__main__":
    main()

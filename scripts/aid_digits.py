"""AID evidence on the bundled digits (CPU): original vs adapted teacher.

prepare digits 16x16 -> mentors (teacher r20, peers r14 and r8; or reused from a finished
`ckd demo`, whose mentors are the same architectures on the same data) -> `adapt-mentor`
the teacher for an r8 student -> one cache with both teachers and the peers (one keyed view
per student epoch) -> r8 students with kd and classroom from the original vs the adapted
teacher, 3 seeds -> `ckd analyze`'s decomposition (inter / intra, table + PNG) of the
seed-0 kd students against their teacher -> a table (results.md) with wall and CPU time per
stage and the load average.

    .venv/bin/python scripts/aid_digits.py --out aid_out
    .venv/bin/python scripts/aid_digits.py --out aid_out --mentors-from demo_out/mentors

Rerunning the same command resumes: finished mentors, the adapted teacher, the cache and
finished student runs are kept. If the adapted teacher lost more than --margin points of
test top-1, a banner says so (after the adaptation and again at the end), the table marks
it, and the script exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


class Stages:
    """Wall and process CPU seconds per stage (CPU: all threads of this process)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t0 = (time.perf_counter(), time.process_time())
        self.load_start = os.getloadavg()

    def start(self) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def done(self, name: str) -> None:
        self.wall[name] = time.perf_counter() - self._t[0]
        self.cpu[name] = time.process_time() - self._t[1]

    def line(self) -> str:
        self.wall["total"] = time.perf_counter() - self._t0[0]
        self.cpu["total"] = time.process_time() - self._t0[1]
        parts = ", ".join(f"{k} {self.wall[k]:.0f}/{self.cpu[k]:.0f}" for k in self.wall)
        load = "/".join(f"{x:.1f}" for x in self.load_start), "/".join(
            f"{x:.1f}" for x in os.getloadavg())
        import torch  # noqa: PLC0415 - imported late, as the rest of ckd

        return (f"time (s, wall/CPU): {parts}; {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads, load average "
                f"(1/5/15 min) {load[0]} at start, {load[1]} at end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="aid_out")
    ap.add_argument("--mentors-from", help="a mentor folder holding digits/resnet20.pt, "
                    "resnet14.pt and resnet8.pt trained on 16x16 digits (e.g. a finished "
                    "`ckd demo`'s demo_out/mentors): reused instead of training them")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--mentor-epochs", type=int, default=15)
    ap.add_argument("--student-epochs", type=int, default=8)
    ap.add_argument("--views", type=int, help="cached views (default: --student-epochs)")
    ap.add_argument("--adapt-epochs", type=int, default=4)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--anchor", type=float, default=1.0)
    ap.add_argument("--margin", type=float, default=1.0,
                    help="allowed test top-1 drop of the adapted teacher (points)")
    args = ap.parse_args()

    from ckd.aid.adapt import accuracy_warning, adapt_mentor
    from ckd.aid.analyze import decompose_over_train, write_analysis
    from ckd.cache import build_cache
    from ckd.cli.aid import MARGIN_EXCEEDED_EXIT
    from ckd.data.beton import write_betons
    from ckd.data.datasets import load_dataset
    from ckd.models import load_checkpoint, read_checkpoint_meta, resolve_arch
    from ckd.train import train, train_mentor

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    st = Stages()
    ds = load_dataset("digits", image_size=16)
    prepared = write_betons(ds, out / "data")
    common = dict(prepared=str(prepared), batch_size=64, device="cpu", progress=False,
                  log_every=10, backend="reference")

    st.start()
    mentors, acc, mentor_epochs = {}, {}, {}
    for alias in ("r20", "r14", "r8"):
        done = out / "mentors" / "digits" / f"{resolve_arch(alias)}.pt"
        reuse = Path(args.mentors_from or "") / "digits" / done.name
        if not done.is_file() and args.mentors_from:
            if not reuse.is_file():
                sys.exit(f"--mentors-from {args.mentors_from}: no {reuse} (run `ckd demo` "
                         "first, or leave the option out to train the mentors here)")
            done.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(reuse, done)
        if done.is_file():  # reused or resumed: keep the finished mentor
            meta = read_checkpoint_meta(done)
            mentors[alias], acc[alias] = str(done), meta["metrics"]["test_acc"]
            mentor_epochs[alias] = meta["metrics"].get("epochs", "?")
            continue
        r = train_mentor(alias, None, out=out / "runs" / f"mentor-{alias}",
                         mentor_dir=out / "mentors", epochs=args.mentor_epochs, seed=0,
                         **common)
        mentors[alias], acc[alias] = r["mentor_path"], r["last_acc"]
        mentor_epochs[alias] = args.mentor_epochs
        print(f"[aid] mentor {alias}: {r['last_acc']:.2f}%", flush=True)
    st.done("mentors")

    st.start()
    aid_path = out / "mentors" / "digits" / "resnet20-aid-r8.pt"
    if aid_path.is_file():
        res = read_checkpoint_meta(aid_path)["metrics"]
    else:
        res = adapt_mentor("r20", mentors["r20"], "r8", aid_path, prepared=str(prepared),
                           epochs=args.adapt_epochs, lam=args.lam, anchor=args.anchor,
                           margin=args.margin, progress=False)
    acc["r20aid"] = res["test_acc"]
    st.done("adapt-mentor")
    drop = res["source_test_acc"] - res["test_acc"]
    warning = accuracy_warning(res["source_test_acc"], res["test_acc"], args.margin, aid_path)
    print(f"[aid] adapted teacher: {res['source_test_acc']:.2f}% -> {res['test_acc']:.2f}% "
          f"(drop {drop:.2f}, margin {args.margin:.2f}: "
          f"{'EXCEEDED' if warning else 'within'})", flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    st.start()
    # one keyed view per student epoch: exactly the views an online run would see
    cache = build_cache(ds, {**mentors, "r20aid": str(aid_path)}, out / "cache",
                        views=args.views or args.student_epochs, device="cpu",
                        progress=False)
    st.done("cache")

    st.start()
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
    st.done("students")

    st.start()  # what `ckd analyze` writes, for each teacher vs its seed-0 kd student
    decomp, plots = {}, {}
    for teacher, key, name in (("r20", "kd from original teacher", "original"),
                               ("r20aid", "kd from adapted teacher", "adapted")):
        student = load_checkpoint(Path(rows[key][0]["run"]) / "student.pt")
        table = decompose_over_train(cache, teacher, student, ds, T=4.0)
        decomp[teacher] = table[-1]
        title = (f"KD loss (T=4) of the {name} teacher r20 vs its seed-0 kd student r8, "
                 "digits training set")
        plots[teacher] = str(write_analysis(table, out / "analysis" / name, title)["png"])
    st.done("analyze")

    ok = "within" if not warning else "EXCEEDED"
    lines = [
        f"Teacher r20 adapted for an r8 student (lam {args.lam}, anchor {args.anchor}, "
        f"{args.adapt_epochs} warm-up + {args.adapt_epochs} adaptation epochs): test top-1 "
        f"{res['source_test_acc']:.2f} -> {res['test_acc']:.2f} (drop {drop:.2f}; "
        f"margin {args.margin:.2f}: {ok}). Digits 16x16; mentors r20 "
        f"({mentor_epochs['r20']} epochs), peers r14 ({acc['r14']:.2f}%), r8 "
        f"({acc['r8']:.2f}%); students r8, {args.student_epochs} epochs, seeds "
        f"0..{args.seeds - 1}.", "",
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
    lines += ["", st.line()]
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"acc": acc, "decomposition": decomp, "plots": plots, "students": rows,
         "wall_s": st.wall, "cpu_s": st.cpu, "args": vars(args),
         "adapt": {k: v for k, v in res.items() if k != "model"}}, indent=2))
    print("\n" + table, flush=True)
    print("[aid] decomposition plots: " + ", ".join(plots.values()), flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
        sys.exit(MARGIN_EXCEEDED_EXIT)


if __name__ == "__main__":
    main()

"""Host time of one fused loss forward+backward, on CPU with the kernels stubbed out, beside
a plain `F.cross_entropy` forward+backward of the same student logits in the same run.

    TRITON_INTERPRET=1 python benchmarks/host.py --B 256 --C 100 --M 6

On a GPU a launch is asynchronous: the host's Python work per call (argument checks, the
plan, allocations, the autograd.Function) is what bounds a small step. Here every kernel
launch is replaced by a no-op (`ckd.kernels.specialize.recorded_launches`), so what is
timed is exactly that host work (outputs stay uninitialized: nothing is read). Minimum
over `--repeat` interleaved rounds of `--iters` calls each.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ckd.kernels.specialize import recorded_launches, training_inputs
from ckd.methods import distill_loss

CASES = {"classroom": dict(method="classroom"),
         "classroom-sample": dict(method="classroom", granularity="sample"),
         "kd": dict(method="kd"), "aver": dict(method="aver"),
         "dgkd": dict(method="dgkd", step=3), "dkd": dict(method="dkd", epoch=5)}


def measure(B: int, C: int, M: int, cases, iters: int, repeat: int) -> list[dict]:
    """Seconds per call of each case, the minimum over `repeat` rounds (the rounds of all
    cases interleaved, so a busy machine slows every case alike; the minimum is the least
    disturbed round)."""
    zs, zm, y, stats = training_inputs(B, C, M, fill=True)
    zs = zs.detach()

    def cross_entropy():
        z = zs.requires_grad_()
        F.cross_entropy(z, y).backward()
        z.grad = None

    def fused(kw):
        def call():
            z = zs.requires_grad_()
            with recorded_launches():
                distill_loss(z, zm, y, backend="triton", validate=False,
                             mentor_stats=stats, **kw).loss.backward()
            z.grad = None
        return call

    fns = {"F.cross_entropy": cross_entropy, **{c: fused(CASES[c]) for c in cases}}
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()  # warm-up: plans, constant tables
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / iters)
    base = best["F.cross_entropy"]
    return [dict(case=name, us=t * 1e6, x_ce=t / base) for name, t in best.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--C", type=int, default=100)
    ap.add_argument("--M", type=int, default=6)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.B, args.C, args.M, args.cases, args.iters, args.repeat)
    print(f"host time per forward+backward, B={args.B} C={args.C} M={args.M}, kernels "
          "stubbed, 1 torch thread")
    print("| case | us per call | x F.cross_entropy |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['us']:.1f} | {r['x_ce']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

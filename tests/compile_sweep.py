"""Compile every loss kernel launch of every registered fused logit method for sm_90, at
the shapes Triton specializes on, on the training path (student rows contiguous, mentor
rows padded to 16 bytes as the cache gathers them, stored mentor statistics passed).

    TRITON_INTERPRET= python tests/compile_sweep.py --B 1 2 16 17 4096 --C 2 16 17 32000

Cases: every method x every combination of its choice parameters (variant x
granularity), plus the kernel features a numeric parameter switches on (classroom's
delta term); every (student, mentor) dtype layout given; dense and sparse mentors.
C = 1 is refused by distill_loss before any kernel (a distribution over one class).
Launches with equal compile keys are compiled once. Prints one JSON line: the number of
launches, distinct compiles and the failures (kernel, case, error).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback

import torch

# numeric parameters whose non-default value switches a kernel feature on
FEATURES = {"classroom": [dict(delta=0.5)]}
COUNTERS = dict(seed=3, step=5, epoch=2)
LAYOUTS = {"fp32/fp16": (torch.float32, torch.float16), "bf16/fp16": (torch.bfloat16,
           torch.float16), "fp32/bf16": (torch.float32, torch.bfloat16),
           "fp32/fp32": (torch.float32, torch.float32), "fp16/fp16": (torch.float16,
           torch.float16)}


def method_cases(methods=None) -> dict[str, dict]:
    """name -> distill_loss kwargs, from the registry: each fused logit method with every
    combination of its choice parameters, plus FEATURES."""
    from ckd.methods.registry import all_methods

    cases = {}
    for name, spec in all_methods().items():
        if not (spec.logit and spec.fused) or (methods and name not in methods):
            continue
        choice = [p for p in spec.params if p.choices]
        for values in itertools.product(*[p.choices for p in choice]):
            kw = {p.name: v for p, v in zip(choice, values, strict=True)}
            cases["-".join([name, *map(str, values)])] = dict(method=name, **kw)
        for i, extra in enumerate(FEATURES.get(name, [])):
            cases[f"{name}-feature{i}"] = dict(method=name, **extra)
    for kw in cases.values():
        spec = all_methods()[kw["method"]]
        kw.update({k: v for k, v in COUNTERS.items() if k in spec.counters})
    return cases


def sparse_calls(kw: dict, B: int, C: int, M: int, student, mentor) -> list:
    """Recorded launches of a sparse-mentor loss (top-k teacher, sampled peers)."""
    from ckd.kernels.api import distill_loss
    from ckd.kernels.sparse_mentors import SparseMentors
    from ckd.kernels.specialize import recorded_launches

    K = min(4, C - 1)
    ids = torch.zeros(M, B, K, dtype=torch.int32)
    sm = SparseMentors(ids, torch.zeros(M, B, K, dtype=mentor), torch.ones_like(ids),
                       *(torch.zeros(M, B) for _ in range(4)),
                       ("topk",) + ("sample",) * (M - 1), C)
    zs = torch.empty(B, C, dtype=student).requires_grad_()
    with recorded_launches() as calls:
        distill_loss(zs, sm, torch.zeros(B, dtype=torch.int64), backend="triton",
                     validate=False, **kw).loss.backward()
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, nargs="+", default=[1, 2, 16, 17, 4096])
    ap.add_argument("--C", type=int, nargs="+", default=[2, 16, 17, 32000])
    ap.add_argument("--M", type=int, default=3)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--sparse", action="store_true", help="also sparse mentors")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET (the kernels must be compiled)")
    from ckd.kernels.sparse_reference import SPARSE_METHODS
    from ckd.kernels.specialize import compile_launch, loss_calls, spec_key

    seen: dict[tuple, str | None] = {}
    launches, failures = 0, []
    for (name, kw), B, C, layout in itertools.product(method_cases(args.methods).items(),
                                                       args.B, args.C, args.layouts):
        student, mentor = LAYOUTS[layout]
        calls = [("dense", c) for c in loss_calls(kw, B, C, args.M, student, mentor)]
        if args.sparse and kw["method"] in SPARSE_METHODS and C >= 3 and B <= 64:
            calls += [("sparse", c) for c in sparse_calls(kw, B, C, args.M, student, mentor)]
        for path, call in calls:
            launches += 1
            key = spec_key(call, args.arch)
            if key not in seen:
                try:
                    compile_launch(call, args.arch)
                    seen[key] = None
                except Exception as err:  # noqa: BLE001 - reported, the test fails on it
                    seen[key] = f"{type(err).__name__}: {err}"[-1500:]
                    traceback.print_exc(file=sys.stderr)
            if seen[key] is not None:
                failures.append(dict(kernel=call[0].__name__, case=name, path=path, B=B, C=C,
                                     layout=layout, error=seen[key]))
    print(json.dumps(dict(launches=launches, compiles=len(seen), failures=failures)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

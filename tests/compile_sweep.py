"""Compile every loss kernel launch of every registered fused logit method for sm_90, at
the shapes Triton specializes on, on the training path (student rows contiguous, mentor
rows padded to 16 bytes as the cache gathers them, stored mentor statistics passed).

    TRITON_INTERPRET= python tests/compile_sweep.py --B 1 2 16 17 4096 --C 2 16 17 32000

Cases: from the registry (tests/registry_cases.py): every method x every combination of
its choice parameters (variant x granularity), plus the kernel features a numeric
parameter switches on (classroom's delta term); every (student, mentor) dtype layout
given; dense and sparse mentors.
C = 1 is refused by distill_loss before any kernel (a distribution over one class).
`--pose`: also the pose losses (kd, aver, classroom with external PCK keys) on B joint
rows of SimCC segments x (C bins, at offset 0) and y (C + 1 bins, at offset C) of rows
[B, 1, 2C + 1], as `ckd.pose.fused` launches them.
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
from pathlib import Path

import torch

LAYOUTS = {"fp32/fp16": (torch.float32, torch.float16), "bf16/fp16": (torch.bfloat16,
           torch.float16), "fp32/bf16": (torch.float32, torch.bfloat16),
           "fp32/fp32": (torch.float32, torch.float32), "fp16/fp16": (torch.float16,
           torch.float16)}


def sparse_calls(table, B: int, C: int, M: int, student, mentor, counters) -> list:
    """Recorded launches of a sparse-mentor loss (top-k teacher, sampled peers)."""
    from ckd.kernels.api import terms_loss
    from ckd.kernels.sparse_mentors import SparseMentors
    from ckd.kernels.specialize import recorded_launches

    K = min(4, C - 1)
    ids = torch.zeros(M, B, K, dtype=torch.int32)
    sm = SparseMentors(ids, torch.zeros(M, B, K, dtype=mentor), torch.ones_like(ids),
                       *(torch.zeros(M, B) for _ in range(4)),
                       ("topk",) + ("sample",) * (M - 1), C)
    zs = torch.empty(B, C, dtype=student).requires_grad_()
    with recorded_launches() as calls:
        terms_loss(zs, sm, torch.zeros(B, dtype=torch.int64), table, validate=False,
                   **counters).loss.backward()
    return calls


def pose_calls(method: str, B: int, C: int, M: int, student, mentor) -> list:
    """Recorded launches of a fused pose loss forward + backward (ckd.pose.fused)."""
    from ckd.kernels.specialize import recorded_launches
    from ckd.pose.fused import fused_pose_loss

    D = 2 * C + 1
    zs = torch.empty(B, 1, D, dtype=student).requires_grad_()
    zm = torch.empty(M, B, 1, D, dtype=mentor)
    keys = {"student_key": torch.zeros(B), "mentor_keys": torch.zeros(M, B)} \
        if method == "classroom" else {}
    with recorded_launches() as calls:
        loss, _ = fused_pose_loss(method, zs, zm, torch.zeros(B, 1, D), torch.zeros(B, 1),
                                  [(0, C), (C, D)], **keys)
        loss.backward()
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, nargs="+", default=[1, 2, 16, 17, 4096])
    ap.add_argument("--C", type=int, nargs="+", default=[2, 16, 17, 32000])
    ap.add_argument("--M", type=int, default=3)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--sparse", action="store_true", help="also sparse mentors")
    ap.add_argument("--pose", action="store_true", help="also the fused pose losses")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET (the kernels must be compiled)")
    sys.path.insert(0, str(Path(__file__).parent))
    from registry_cases import COUNTERS, method_cases, table_of

    from ckd.kernels.specialize import compile_launch, loss_calls, spec_key
    from ckd.kernels.terms import TermTable
    from ckd.methods.registry import get_method

    seen: dict[tuple, str | None] = {}
    launches, failures = 0, []
    cases = list(method_cases(args.methods).items())
    if args.pose:
        cases += [(f"pose-{m}", {"pose": m}) for m in ("kd", "aver", "classroom")]
    for (name, kw), B, C, layout in itertools.product(cases, args.B, args.C, args.layouts):
        student, mentor = LAYOUTS[layout]
        if "pose" in kw:
            calls = [("pose", c) for c in pose_calls(kw["pose"], B, C, args.M, student,
                                                     mentor)]
        else:
            spec = get_method(kw["method"])
            table = table_of(kw, args.M)
            counters = {k: COUNTERS[k] for k in spec.counters}
            calls = [("dense", c) for c in loss_calls(table, B, C, args.M, student, mentor,
                                                      **counters)]
            if args.sparse and spec.sparse is not None and isinstance(table, TermTable) \
                    and C >= 3 and B <= 64:
                calls += [("sparse", c) for c in sparse_calls(table, B, C, args.M, student,
                                                              mentor, counters)]
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

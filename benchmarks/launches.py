"""Kernel launches per loss call and per training step, counted on CPU (no GPU needed).

A GPU step bound by the host costs ~5-10 us per launch, so the count is the static
evidence of what the step can reach. Counted: every aten op dispatched that is not a
pure allocation or view (TorchDispatchMode; on CUDA each is at least one kernel launch)
plus every Triton kernel launch (the interpreter's launch entry point).

    TRITON_INTERPRET=1 python benchmarks/launches.py

The training step: resnet20 student (channels_last) on a CIFAR batch of 64, six cached
mentors' logits gathered from an in-memory [M, S*N, C] table, keyed views, the loss,
backward, SGD (foreach, momentum, weight decay).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ckd.hashing import seed_keys

NO_LAUNCH = {"empty.memory_format", "empty_strided.default", "detach.default", "view.default",
             "select.int", "slice.Tensor", "alias.default", "expand.default",
             "as_strided.default", "_unsafe_view.default", "t.default", "permute.default",
             "unsqueeze.default", "squeeze.dim", "transpose.int", "lift_fresh.default",
             "_reshape_alias.default", "reshape.default", "unbind.int", "split.Tensor",
             "new_empty.default", "new_empty_strided.default", "empty_like.default",
             "unfold.default"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False  # inside the Triton interpreter (its numpy round trips)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name not in NO_LAUNCH and not self.paused:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting():
    """Yields (aten op counter, triton launch counter)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: Counter = Counter()
    saved = InterpretedFunction.run
    mode = Count()

    def run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        mode.paused = True
        try:
            return saved(self, *args, **kwargs)
        finally:
            mode.paused = False

    InterpretedFunction.run = run
    try:
        with mode:
            yield mode.ops, launches
    finally:
        InterpretedFunction.run = saved


def loss_counts(B=64, C=100, M=6) -> list[tuple[str, int, int]]:
    from ckd.kernels import distill_loss

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(B, C, generator=g).requires_grad_()
    zm = (2 * torch.randn(M, B, C, generator=g)).half()
    y = torch.randint(0, C, (B,), generator=g)
    kw = {}
    try:  # the cache's mentor statistics, where this version of the loss takes them
        from ckd.kernels.fused import mentor_row_stats

        kw["mentor_stats"] = mentor_row_stats(zm, y)
    except ImportError:
        pass
    rows = []
    cases = {"classroom (batch)": dict(method="classroom"),
             "classroom (sample)": dict(method="classroom", granularity="sample"),
             "aver": dict(method="aver"), "kd": dict(method="kd"),
             "dgkd": dict(method="dgkd", step=3), "dkd": dict(method="dkd", epoch=3)}
    for name, case in cases.items():
        distill_loss(zs, zm, y, backend="triton", validate=False, **kw, **case)  # warm-up
        one = torch.ones(())  # the upstream gradient (a layer's, in training)
        with counting() as (ops, launches):
            out = distill_loss(zs, zm, y, backend="triton", validate=False, **kw, **case)
            torch.autograd.grad(out.loss, zs, one)
        rows.append((name, sum(launches.values()), sum(ops.values()), dict(launches), dict(ops)))
    return rows


def step_counts(B=64, C=100, M=6) -> dict[str, int]:
    """Launches of each part of one training step (after a warm-up step)."""
    from ckd.data import views as V
    from ckd.kernels import distill_loss
    from ckd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=C).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                          foreach=True)
    images = torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, C, (B,))
    table = torch.randn(M, 4 * 1000, C).half()  # the memory-mode cache
    idx = torch.randint(0, 1000, (B,))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    parts: dict[str, int] = {}

    def count(name, fn):
        with counting() as (ops, launches):
            out = fn()
        parts[name] = sum(ops.values()) + sum(launches.values())
        return out

    def views_kernel():  # what apply_views/view_ids run on CUDA (one kernel each)
        from ckd.kernels.views import view_ids_fused, views_fused

        ids = view_ids_fused(seed_keys(7), idx)
        scale, shift = V._affine(mean, std, images.device)
        return views_fused(images, scale, shift, ids=ids, channels_last=True)[0], ids

    def views_torch():
        ids = V.view_ids(7, idx)
        return V.apply_views(images, ids, mean, std, channels_last=True), ids

    for warm in (True, False):
        x, ids = (views_torch() if warm else count("views (torch ops, CPU path)", views_torch))
        if not warm:
            try:
                count("views (CUDA path: fused kernels)", views_kernel)
            except ImportError:
                pass
        zm = count("cache gather", lambda ids=ids: table.index_select(1, ids % 4 * 1000 + idx))
        logits = count("student forward", lambda x=x: model(x))
        out = count("loss forward", lambda lo=logits, zm=zm: distill_loss(
            lo, zm, labels, method="classroom", backend="triton", validate=False))
        count("zero_grad + backward (student + loss)",
              lambda out=out: (opt.zero_grad(set_to_none=True), out.loss.backward()))
        count("optimizer (SGD foreach)", opt.step)
    return parts


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (Triton launches are counted through the interpreter)")
    torch.set_num_threads(1)
    print("| loss fwd+bwd (B=64, C=100, M=6) | Triton launches | other launching aten ops |"
          " total |\n|---|---|---|---|")
    for name, tri, ops, launches, aten in loss_counts():
        print(f"| {name} | {tri} ({', '.join(f'{k} x{v}' for k, v in launches.items())}) | "
              f"{ops} {sorted(aten)} | {tri + ops} |")
    parts = step_counts()
    print("\n| training step part (resnet20, B=64, classroom, cached) | launches |\n|---|---|")
    for name, n in parts.items():
        print(f"| {name} | {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

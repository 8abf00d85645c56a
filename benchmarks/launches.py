"""Kernel launches per loss call and per training step, counted on CPU (no GPU needed).

A GPU step bound by the host costs ~5-10 us per launch, so the count is the static
evidence of what the step can reach. Counted: every aten op dispatched that is not a
pure allocation or view (TorchDispatchMode; on CUDA each is at least one kernel launch)
plus every Triton kernel launch (the interpreter's launch entry point).

    TRITON_INTERPRET=1 python benchmarks/launches.py

The training step, by part: resnet20 student (channels_last) on a CIFAR batch of 64, six
cached mentors' logits and statistics gathered from an in-memory [M, S*N, C] table with
16-byte rows, keyed views, the loss, backward, SGD (foreach, momentum, weight decay).

The trainer's own step (`ckd.train.train`, resnet20, classroom from a 6-mentor cache,
batch 64), eager and with `--cuda-graphs`: every op of each student step counted after
the first epoch (warm-up), and the batch's mentor gather; with `--cuda-graphs` the replay
is one graph launch (on CPU the captured step runs uncounted in its place) plus the
copies of the batch into the graph's input buffers.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ckd.hashing import seed_keys
from ckd.row_align import padded_width

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
        self.paused = 0  # > 0: inside the Triton interpreter (its numpy round trips) or
        # work that runs uncounted (a graph replay's captured step)

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
        if not mode.paused:
            launches[self.fn.__name__] += 1
        mode.paused += 1
        try:
            return saved(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    InterpretedFunction.run = run
    ACTIVE.append(mode)
    try:
        with mode:
            yield mode.ops, launches
    finally:
        ACTIVE.pop()
        InterpretedFunction.run = saved


ACTIVE: list[Count] = []  # the counting modes in use (innermost last)


def loss_counts(B=64, C=100, M=6) -> list[tuple[str, int, int]]:
    from ckd.methods import distill_loss

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(B, C, generator=g).requires_grad_()
    zm = (2 * torch.randn(M, B, C, generator=g)).half()
    y = torch.randint(0, C, (B,), generator=g)
    kw = {}
    try:  # the cache's mentor statistics, where this version of the loss takes them
        from ckd.kernels.launch import mentor_row_stats

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
    from ckd.methods import distill_loss
    from ckd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=C).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                          foreach=True)
    images = torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, C, (B,))
    table = torch.zeros(M, 4 * 1000, padded_width(C, torch.float16)).half()  # memory cache
    table[..., :C] = torch.randn(M, 4 * 1000, C).half()
    stats_table = torch.randn(M, 4 * 1000, 2)
    idx = torch.randint(0, 1000, (B,))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    parts: dict[str, int] = {}

    def count(name, fn):
        with counting() as (ops, launches):
            out = fn()
        parts[name] = sum(ops.values()) + sum(launches.values())
        return out

    def views_kernel():  # what apply_views/view_ids run on CUDA (one kernel each)
        from ckd.data.views_triton import view_ids_fused, views_fused

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
        zm, st = count("cache gather (logits + statistics)", lambda ids=ids: tuple(
            t.index_select(1, ids % 4 * 1000 + idx) for t in (table, stats_table)))
        zm = zm[..., :C]
        logits = count("student forward", lambda x=x: model(x))
        out = count("loss forward", lambda lo=logits, zm=zm, st=st: distill_loss(
            lo, zm, labels, method="classroom", backend="triton", validate=False,
            mentor_stats=st))
        count("zero_grad + backward (student + loss)",
              lambda out=out: (opt.zero_grad(set_to_none=True), out.loss.backward()))
        count("optimizer (SGD foreach)", opt.step)
    return parts


def trainer_counts(B=64, C=100, steps=4) -> dict[str, dict[str, float]]:
    """Launches per step of `ckd.train.train` itself, eager and --cuda-graphs (see top)."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from train import CLASSROOM, make_mentors

    from ckd.cache import build_cache
    from ckd.data import load_dataset
    from ckd.train import TrainConfig, train
    from ckd.train import epoch as E
    from ckd.train import graphs as G
    from ckd.train import mentors as MS

    root = Path(tempfile.mkdtemp(prefix="ckd-launches-"))
    opts = dict(n_train=steps * B, n_test=8, num_classes=C, seed=0)
    cache = build_cache(load_dataset("synthetic", **opts), make_mentors(root / "m", C),
                        root / "cache", views=1, progress=False)
    base = dict(dataset="synthetic", dataset_options=opts, student="resnet20", epochs=2,
                batch_size=B, device="cpu", backend="triton", progress=False,
                log_every=10**9, eval_every=10**9, method="classroom", cache=str(cache),
                mentors=CLASSROOM, schedule="constant")
    out: dict[str, dict[str, float]] = {}
    from ckd.methods.compose import LossPlan

    saved = (E._StudentEpoch.step, MS.CachedMentors.gather, G.GraphedStep.__call__,
             TrainConfig._check_cuda_graphs, G.check_capturable, torch.optim.SGD.step,
             LossPlan.loss)
    for mode in ("eager", "--cuda-graphs"):
        totals: Counter = Counter()

        def counted(name, fn, *a, totals=totals, **k):
            if not getattr(counted, "on", False) or any(m.paused for m in ACTIVE):
                return fn(*a, **k)
            with counting() as (ops, launches):
                res = fn(*a, **k)
            totals[name] += sum(ops.values()) + sum(launches.values())
            return res

        def step(self, *a, **k):
            counted.on = self.epoch >= 1  # the first epoch warms up (and captures)
            return counted("student step (trainer)", saved[0], self, *a, **k)

        def gather(self, *a, **k):
            return counted("mentor gather (trainer)", saved[1], self, *a, **k)

        def replay(self, key, *inputs, totals=totals):  # one graph launch + input copies
            for mode_ in ACTIVE:
                mode_.paused += 1
            try:
                res = self.step(*inputs)  # the captured work, run uncounted in its place
            finally:
                for mode_ in ACTIVE:
                    mode_.paused -= 1
            copies = sum(t is not None for t in inputs)
            if ACTIVE:  # counted in the student step's total, and shown on their own
                ACTIVE[-1].ops["graph launch + input copies"] += 1 + copies
                totals["  of which: graph launch"] += 1
                totals["  of which: copies into the graph's inputs"] += copies
            return res

        def sgd(self, *a, **k):
            return counted("  of which: SGD step", saved[5], self, *a, **k)

        def loss(self, *a, **k):
            return counted("  of which: loss forward", saved[6], self, *a, **k)

        E._StudentEpoch.step, MS.CachedMentors.gather = step, gather
        torch.optim.SGD.step, LossPlan.loss = sgd, loss
        if mode != "eager":
            G.GraphedStep.__call__ = replay
            TrainConfig._check_cuda_graphs = lambda self: None
            G.check_capturable = lambda run: None
        try:
            train(dict(base, cuda_graphs=mode != "eager", out=str(root / mode)))
        finally:
            (E._StudentEpoch.step, MS.CachedMentors.gather, G.GraphedStep.__call__,
             TrainConfig._check_cuda_graphs, G.check_capturable, torch.optim.SGD.step,
             LossPlan.loss) = saved
        out[mode] = {k: v / steps for k, v in totals.items()}
    return out


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
    if "--no-trainer" not in sys.argv:
        rows = trainer_counts()
        print("\n| ckd.train.train per step (resnet20, B=64, classroom, 6 cached mentors) | "
              "eager | --cuda-graphs |\n|---|---|---|")
        for name in sorted(rows["eager"] | rows["--cuda-graphs"],
                           key=lambda n: (n.startswith("mentor"), n.startswith(" "))):
            print(f"| {name} | {rows['eager'].get(name, 0):.0f} | "
                  f"{rows['--cuda-graphs'].get(name, 0):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

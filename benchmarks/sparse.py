"""Sparse mentor logits: error against dense on real mentor logits, storage per mode, and
speed of the loss on sparse vs dense mentors.

    .venv/bin/python benchmarks/sparse.py error   [--epochs 15] [--dataset synthetic|digits]
    .venv/bin/python benchmarks/sparse.py storage
    .venv/bin/python benchmarks/sparse.py speed   [--sizes 256x1000,4096x1000,...] [--threads 2]
                                                  [--max-gib 12]
    .venv/bin/python benchmarks/sparse.py read    [--n 4096] [--views 4] [--classes 100]

`error`: trains a mentor (resnet20) and a weaker student (resnet8, half the epochs) with plain
SGD on keyed views, then compares, on their logits for n train images, the sparse loss
(topk:K with each rest model, sample:S) with the dense loss at the temperatures ClassroomKD
uses (tau_m in [1, 13]): relative error of the batch T^2 KL and of its gradient, and the
rest bucket's log-mass error. `speed`: fwd+bwd of the eager reference loss per case, each
case in its own process (its peak RSS reported; a case predicted to exceed --max-gib is
skipped and says so). `read`: rows/s of the cache reader per storage mode, memory and stream.
Every number is measured by this script (CPU here).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ckd.data import load_dataset
from ckd.kernels import reference as ref
from ckd.kernels import sparse_reference as sr
from ckd.kernels.sparse_mentors import bytes_per_row, sparsify_sample, sparsify_topk
from ckd.methods import get_method

sys.path.insert(0, str(Path(__file__).parent))
TEMPS = (1.0, 2.0, 4.0, 8.0, 13.0)


def _kl_and_grad(fn, zs: torch.Tensor, T: float) -> tuple[float, torch.Tensor]:
    zs = zs.clone().requires_grad_(True)
    loss = T * T * fn(zs, T).mean()
    (g,) = torch.autograd.grad(loss, zs)
    return float(loss.detach()), g


@torch.no_grad()
def _logits(model, ds, n: int) -> torch.Tensor:
    from ckd.data import apply_views

    imgs = torch.from_numpy(ds.train.images[:n])
    x = apply_views(imgs, torch.zeros(n, dtype=torch.int64), ds.mean, ds.std)
    return model(x).float()


def error(args) -> None:
    from cache import train_mentor  # benchmarks/cache.py

    ds = load_dataset("digits") if args.dataset == "digits" else \
        load_dataset("synthetic", n_train=2048, n_test=256, num_classes=100)
    t0 = time.perf_counter()
    n = min(args.n, len(ds.train))
    saved = Path(args.logits) if args.logits else None
    if saved is not None and saved.exists():  # mentor/student logits of an earlier run
        zm, zs = torch.load(saved).values()
    else:
        mentor = train_mentor("resnet20", ds, args.epochs, seed=0)
        student = train_mentor("resnet8", ds, max(1, args.epochs // 2), seed=1)
        zm = _logits(mentor, ds, n).half()[None]
        zs = _logits(student, ds, n).double()
        if saved is not None:
            torch.save({"mentor": zm, "student": zs}, saved)
    y = torch.from_numpy(ds.train.labels[:n]).long()
    C = ds.num_classes
    acc_m = float((zm[0].argmax(1) == y).float().mean())
    acc_s = float((zs.argmax(1) == y).float().mean())
    print(f"# Sparse vs dense error ({ds.name}, C={C}, {n} train images, view 0)\n")
    print(f"Command: `.venv/bin/python benchmarks/sparse.py error --dataset {args.dataset} "
          f"--epochs {args.epochs} --n {args.n}` ({time.perf_counter() - t0:.0f} s training; "
          f"mentor resnet20 top-1 {100 * acc_m:.1f}%, student resnet8 {100 * acc_s:.1f}%)\n")
    print("Relative error of the batch T^2 KL (value) and of its gradient w.r.t. the "
          "student logits (||g - g_dense|| / ||g_dense||); rest: mean |log R_hat - log R| "
          "of the rest bucket's tempered mass.\n")
    print("| mode | rest model | T | value err | grad err | rest log-mass err |")
    print("|---|---|---|---|---|---|")
    ks = [k for k in args.k if k < C]
    for k in ks:
        sm = sparsify_topk(zm, y, k)
        z = zm[0].double()
        member = torch.zeros_like(z, dtype=torch.bool).scatter(1, sm.ids[0].long(), True)
        n_rest = torch.full((n,), C - k)
        for model in (*sr.REST_MODELS, "oracle"):
            for T in TEMPS:
                v_d, g_d = _kl_and_grad(lambda s, T: ref.kl_rows(zm[0], s, T), zs, T)
                true_r = torch.logsumexp((z / T).masked_fill(member, float("-inf")), 1)
                use = sm
                if model == "oracle":  # the true tempered rest mass: coarsening error only
                    use = copy.copy(sm)
                    log_n = torch.log(n_rest.double())
                    use.rest_lse = (log_n + (true_r - log_n) * T)[None].float()
                v_s, g_s = _kl_and_grad(
                    lambda s, T, sm=use, model=model: sr.sparse_kl_rows(
                        sm, 0, s, T, rest_model="equal" if model == "oracle" else model),
                    zs, T)
                est_r = sr.rest_log_mass(use.rest_lse[0].double(), use.rest_mean[0].double(),
                                         n_rest, 1.0 / T,
                                         "equal" if model == "oracle" else model)
                print(f"| topk:{k} | {model} | {T:g} | {abs(v_s - v_d) / v_d:.4f} | "
                      f"{float((g_s - g_d).norm() / g_d.norm()):.4f} | "
                      f"{float((est_r - true_r).abs().mean()):.4f} |")
    for s in args.s:
        sm = sparsify_sample(zm, y, s, torch.Generator().manual_seed(0))
        for T in TEMPS:
            v_d, g_d = _kl_and_grad(lambda st, T: ref.kl_rows(zm[0], st, T), zs, T)
            v_s, g_s = _kl_and_grad(lambda st, T, sm=sm: sr.sparse_kl_rows(sm, 0, st, T),
                                    zs, T)
            print(f"| sample:{s} | - | {T:g} | {abs(v_s - v_d) / v_d:.4f} | "
                  f"{float((g_s - g_d).norm() / g_d.norm()):.4f} | - |")


def storage(args) -> None:
    print("# Stored bytes per view and mentor (uncompressed; 8 B of per-view mentor "
          "statistics included)\n")
    print("Command: `.venv/bin/python benchmarks/sparse.py storage`\n")
    rows = [("CIFAR-100, 50k images x 162 views", 100, 50_000 * 162),
            ("ImageNet-1k, 1.28M images x 300 views", 1000, 1_281_167 * 300)]
    specs = ["dense", "topk:5", "topk:10", "topk:20", "sample:8", "sample:16", "sample:64"]
    for name, C, views in rows:
        print(f"\n{name} (C = {C}):\n")
        print("| mode | bytes/view | ratio to dense | total per mentor |")
        print("|---|---|---|---|")
        dense = bytes_per_row("dense", C)
        for spec in specs:
            b = bytes_per_row(spec, C)
            print(f"| {spec} | {b} | {b / dense:.3f} | {b * views / 2**30:.1f} GiB |")


def _mentors_for(spec: str, m: int, B: int, C: int):
    """(loss function, mentors, mentor bytes per batch) of one case, inputs seeded."""
    g = torch.Generator().manual_seed(0)
    zm = (torch.randn(m, B, C, generator=g) * 3).half()
    if spec == "dense":
        return zm, m * B * C * 2
    mode, k = spec.split(":")
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
    sm = sparsify_topk(zm, y, int(k)) if mode == "topk" else \
        sparsify_sample(zm, y, int(k), torch.Generator().manual_seed(0))
    return sm, m * B * bytes_per_row(spec, C)


def _time_case(method: str, spec: str, m: int, B: int, C: int, threads: int,
               min_time: float) -> tuple[float, int, int, float, float]:
    """(ms per fwd+bwd, steps timed, mentor bytes, peak RSS GiB, RSS GiB before the case)
    of one case, run in a fresh process (spawned) so that its peak memory is its own."""
    import resource

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    torch.set_num_threads(threads)
    mentors, nbytes = _mentors_for(spec, m, B, C)
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
    fn = get_method(method).run_reference if spec == "dense" else \
        get_method(method).run_sparse_reference

    def step():
        s = zs.clone().requires_grad_(True)
        loss, _ = fn(s, mentors, y)
        loss.backward()

    step()  # warm-up
    reps, t = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t < min_time:
        step()
        reps += 1
    ms = (time.perf_counter() - t) / reps * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return ms, reps, nbytes, peak, base


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def speed(args) -> None:
    """Each case in its own spawned process (its peak RSS is its own). A case whose peak,
    extrapolated linearly in B from the same (C, mentors) at a smaller B (the process's
    RSS before the case held fixed), would exceed --max-gib is not run: the row says so
    with the prediction."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    print(f"# Loss speed, sparse vs dense mentors (eager reference on CPU: "
          f"{platform.processor() or platform.machine()}, {args.threads} threads of "
          f"{os.cpu_count()} cores, shared), M={args.m}, method {args.method}\n")
    print(f"Command: `.venv/bin/python benchmarks/sparse.py speed --sizes {args.sizes} "
          f"--specs {args.specs} --threads {args.threads} --max-gib {args.max_gib:g}` (load "
          f"average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
          f"{_available_gib():.1f} GiB available)\n")
    print("| B | C | mentors | fwd+bwd ms | steps timed | mentor bytes/batch | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    peaks: dict[tuple[int, str], tuple[int, float, float]] = {}
    for size in args.sizes.split(","):
        B, C = (int(v) for v in size.split("x"))
        for spec in ["dense", *args.specs.split(",")]:
            known = peaks.get((C, spec))
            if known is not None:
                b0, peak0, base = known
                predicted = base + (peak0 - base) * B / b0
                if predicted > args.max_gib:
                    print(f"| {B} | {C} | {spec} | not run: predicted peak {predicted:.1f} "
                          f"GiB > {args.max_gib:g} GiB | - | - | - |", flush=True)
                    continue
            with ctx.Pool(1) as pool:
                ms, reps, nbytes, peak, base = pool.apply(
                    _time_case, (args.method, spec, args.m, B, C, args.threads, args.min_time))
            peaks[(C, spec)] = (B, peak, base)
            print(f"| {B} | {C} | {spec} | {ms:.1f} | {reps} | {nbytes / 2**20:.2f} MiB | "
                  f"{peak:.2f} GiB |", flush=True)
    print(f"\nLoad average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


def read(args) -> None:
    """Cache read rows/s per mode: one store per mode of the same 2 (untrained) mentors, read
    in memory mode (random gathers after the load) and in stream mode (one epoch planned
    and gathered in random batches, the background reads included)."""
    import tempfile

    from ckd.cache import build_cache, open_cache
    from ckd.models import create_model, save_checkpoint

    torch.set_num_threads(args.threads)
    ds = load_dataset("synthetic", n_train=args.n, n_test=64, num_classes=args.classes)
    print(f"# Cache read rows/s per mode ({args.n} samples x {args.views} views, "
          f"C={args.classes}, 2 mentors, batch {args.batch}, CPU {args.threads} threads, "
          "shared)\n")
    print(f"Command: `.venv/bin/python benchmarks/sparse.py read --n {args.n} --views "
          f"{args.views} --batch {args.batch} --classes {args.classes} --specs {args.specs}` "
          f"(load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])})\n")
    print("One row = one mentor's view of one sample. memory: open (load) time, then random "
          "gathers; stream: open time, then one whole epoch (start_epoch + gathers of every "
          "sample in random batches, reading the store in the background).\n")
    print("| logits | reader mode | open s | rows/s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for k, alias in enumerate(("m0", "m1")):
            torch.manual_seed(k)
            save_checkpoint(Path(tmp) / f"{alias}.pt", create_model("resnet8", args.classes),
                            arch="resnet8", num_classes=args.classes, dataset=ds.name,
                            metrics={})
            paths[alias] = Path(tmp) / f"{alias}.pt"
        for spec in args.specs.split(","):
            store = build_cache(ds, paths, Path(tmp) / spec.replace(":", ""),
                                views=args.views, logits=spec, progress=False)
            t = time.perf_counter()
            cache = open_cache(store)
            load = time.perf_counter() - t
            g = torch.Generator().manual_seed(0)
            idx = [torch.randint(0, args.n, (args.batch,), generator=g) for _ in range(50)]
            slots = [torch.randint(0, args.views, (args.batch,), generator=g) for _ in idx]
            cache.gather(slots[0], idx[0])
            t = time.perf_counter()
            for sl, ix in zip(slots, idx, strict=True):
                cache.gather(sl, ix)
            dt = time.perf_counter() - t
            print(f"| {spec} | memory | {load:.2f} | {50 * args.batch * 2 / dt / 1e6:.2f} M |",
                  flush=True)
            t = time.perf_counter()
            with open_cache(store, mode="stream") as st:
                load = time.perf_counter() - t
                t = time.perf_counter()
                st.start_epoch(0, seed=0)
                for batch in torch.randperm(args.n, generator=g).split(args.batch):
                    st.gather(st.epoch_views(0, batch, seed=0)[0], batch)
                dt = time.perf_counter() - t
            print(f"| {spec} | stream | {load:.2f} | {args.n * 2 / dt / 1e6:.2f} M |",
                  flush=True)
    print(f"\nLoad average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("error")
    e.add_argument("--dataset", default="synthetic", choices=["synthetic", "digits"])
    e.add_argument("--epochs", type=int, default=15)
    e.add_argument("--n", type=int, default=1024)
    e.add_argument("--logits", help="save the trained models' logits here / reuse them")
    e.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 20])
    e.add_argument("--s", type=int, nargs="+", default=[8, 16, 64])
    sub.add_parser("storage")
    s = sub.add_parser("speed")
    s.add_argument("--sizes", default="256x1000,4096x1000,256x32000,4096x32000")
    s.add_argument("--specs", default="topk:20,sample:16")
    s.add_argument("--method", default="classroom")
    s.add_argument("--m", type=int, default=6)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--min-time", type=float, default=3.0)
    s.add_argument("--max-gib", type=float, default=12.0,
                   help="skip a case whose extrapolated peak RSS exceeds this")
    r = sub.add_parser("read")
    r.add_argument("--n", type=int, default=4096)
    r.add_argument("--views", type=int, default=4)
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--specs", default="dense,topk:10,sample:16")
    r.add_argument("--classes", type=int, default=100)
    r.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    {"error": error, "storage": storage, "speed": speed, "read": read}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

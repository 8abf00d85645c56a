"""Microbenchmarks of the distillation loss: eager reference vs torch.compile(reference) vs
the fused Triton kernels.

For every (impl, method, B, C, M): forward, backward and forward+backward median time,
peak extra memory, and the achieved bandwidth of forward+backward (minimal bytes: read
student + mentors, write the student gradient) against a measured device-to-device copy
of the same number of bytes. Prints a table, writes benchmarks/out/kernels.csv and
benchmarks/out/kernels.png.

    python benchmarks/kernels.py            # full grid (CUDA: B 64..4096, C 100/1000, M 1/3/6)
    python benchmarks/kernels.py --quick    # small grid (CPU)

On CUDA timings use triton.testing.do_bench (median) and torch.cuda peak memory. On CPU a
perf_counter loop (median) and an op-level torch.profiler estimate of peak memory; the
Triton path needs CUDA and is skipped (the interpreter is a correctness tool, not a
benchmark).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from ckd.methods import distill_loss, get_method
from ckd.options import default_device

METHODS = {
    "classroom-paper": ("classroom", dict(variant="paper")),
    "classroom-official": ("classroom", dict(variant="official")),
    "aver": ("aver", {}),
    "kd": ("kd", {}),
}
DEFAULT_METHODS = "classroom-paper,classroom-official,aver"
# --gpu-check: the fused loss's GPU targets side by side in one run, (method, B, C, M):
# B=256, C=100, M=6 (>= 10x eager, >= 3x torch.compile), B=4096, C=1000, M=6, and the
# large vocabularies (kd at B=4096, C=32000: >= 70 % of copy bandwidth; classroom at
# B=1024, C=32000, M=3: >= 2x torch.compile; the class-blocked path, rows split across
# programs)
GPU_CHECK = [("classroom-paper", 256, 100, 6), ("aver", 256, 100, 6),
             ("classroom-paper", 4096, 1000, 6), ("aver", 4096, 1000, 6),
             ("kd", 4096, 32000, 1), ("classroom-paper", 1024, 32000, 3)]
OUT = Path(__file__).parent / "out"


def bench_cpu(fn, setup=None, reps: int = 20, min_time: float = 0.2) -> float:
    """Median wall time (ms) of fn() on CPU; `setup()` runs untimed before each call."""
    for _ in range(2):
        fn() if setup is None else fn(setup())
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 200):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn() if arg is None else fn(arg)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_cuda(fn, setup=None, grad_to_none=None) -> float:
    import triton.testing

    if setup is None:
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    # backward alone: time each call of fn(arg) with CUDA events, setup outside the window
    times = []
    for i in range(30):
        arg = setup()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(arg)
        e.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e))
    return statistics.median(times)


def peak_mem_mib(fn, device: torch.device) -> float:
    """Peak memory allocated by one fn() beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Measured device-to-device copy bandwidth (GB/s, read + write) for nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bench = bench_cuda if device.type == "cuda" else bench_cpu
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_loss(impl: str, method: str, zs, zm, y):
    name, kw = METHODS[method]
    if impl == "triton":  # the mentors' row statistics come from the cache in training
        from ckd.kernels.launch import mentor_row_stats

        stats = mentor_row_stats(zm, y)
        return lambda: distill_loss(zs, zm, y, method=name, backend="triton", validate=False,
                                    mentor_stats=stats, **kw).loss
    spec = get_method(name)
    fn = partial(spec.reference, **spec.resolve(kw), **spec.counter_values({}))
    if impl == "compile":
        torch._dynamo.reset()  # fresh cache per config: no recompile limit, no eager fallback
        fn = torch.compile(fn, dynamic=False)
    return lambda: fn(zs, zm, y)[0]


def run_one(impl, method, B, C, M, device, sdtype, mdtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    zs = torch.randn(B, C, generator=g).to(device, sdtype).requires_grad_()
    zm = torch.empty(M, B, (C + 7) // 8 * 8, device=device, dtype=mdtype)[:, :, :C]
    zm.copy_(2 * torch.randn(M, B, C, generator=g))  # rows padded to 16 bytes, as the cache
    y = torch.randint(0, C, (B,), generator=g).to(device)
    loss = make_loss(impl, method, zs, zm, y)
    cuda = device.type == "cuda"

    def fwd():  # a training forward (autograd graph built; the fused one computes the grad)
        return loss()

    def fwdbwd():
        zs.grad = None
        loss().backward()

    fwdbwd()  # warm-up / compile
    bench = partial(bench_cuda, grad_to_none=[zs]) if cuda else bench_cpu
    t_fwd = bench(fwd)
    t_fb = bench(fwdbwd)
    t_bwd = (bench_cuda if cuda else bench_cpu)(lambda lo: lo.backward(), setup=loss)
    mem = peak_mem_mib(fwdbwd, device)
    nbytes = zs.numel() * zs.element_size() * 2 + zm.numel() * zm.element_size()
    gbps = nbytes / (t_fb * 1e-3) / 1e9
    return dict(impl=impl, method=method, B=B, C=C, M=M, fwd_ms=t_fwd, bwd_ms=t_bwd,
                fwdbwd_ms=t_fb, peak_mem_mib=mem, min_bytes=nbytes, achieved_gbps=gbps)


def plot(rows, path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["method"], r["C"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (method, C) in zip(axes[0], keys, strict=True):
        for impl in ("eager", "compile", "triton"):
            for M in sorted({r["M"] for r in rows}):
                pts = sorted((r["B"], r["fwdbwd_ms"]) for r in rows if r["impl"] == impl
                             and r["method"] == method and r["C"] == C and r["M"] == M)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=f"{impl} M={M}")
        ax.set(title=f"{method}, C={C}", xlabel="batch B", ylabel="fwd+bwd ms",
               xscale="log", yscale="log")
        ax.legend(fontsize=6)
    fig.suptitle(f"distill_loss fwd+bwd, {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid (for CPU)")
    ap.add_argument("--gpu-check", action="store_true",
                    help="the target cases only, side by side (classroom and aver at "
                         "B=256, C=100 and B=4096, C=1000, M=6; kd at B=4096, C=32000; "
                         "classroom at B=1024, C=32000, M=3): scripts/gpu_check.sh")
    ap.add_argument("--impls", default="eager,compile,triton")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated, of {', '.join(METHODS)} (default: "
                         f"{DEFAULT_METHODS}; with --gpu-check every target case)")
    ap.add_argument("--student-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mentor-dtype", default="float16",
                    choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU torch threads (default 1: the CPU box is shared)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter is not a benchmark")
    device = torch.device(default_device())
    torch.set_num_threads(args.threads)
    import torch._functorch.config as fconf

    fconf.donated_buffer = False  # lets the compiled backward be timed on its own
    impls = args.impls.split(",")
    if device.type == "cpu":
        name = f"CPU ({os.cpu_count()} cores visible, torch threads={args.threads})"
        if "triton" in impls:
            print("Triton path needs CUDA: skipped on this CPU-only machine "
                  "(its correctness is tested under TRITON_INTERPRET=1).")
            impls.remove("triton")
    else:
        name = torch.cuda.get_device_name()
    grid = ([(64, 100, 6), (256, 100, 6), (256, 1000, 6), (256, 100, 1)] if args.quick else
            [(B, C, M) for B in (64, 256, 1024, 4096) for C in (100, 1000) for M in (1, 3, 6)])
    methods = (args.methods or (",".join(METHODS) if args.gpu_check else DEFAULT_METHODS)
               ).split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown --methods {unknown}: choose from {', '.join(METHODS)}")
    cases = ([(m, B, C, M) for m, B, C, M in GPU_CHECK if m in methods] if args.gpu_check
             else [(m, *s) for s in grid for m in methods])
    sd, md = getattr(torch, args.student_dtype), getattr(torch, args.mentor_dtype)
    from tqdm import tqdm

    jobs = [(i, *case) for case in cases for i in impls]
    rows = [run_one(i, m, B, C, M, device, sd, md) for i, m, B, C, M in tqdm(jobs)]
    by_bytes = {}
    for r in rows:
        nb = r["min_bytes"]
        if nb not in by_bytes:
            by_bytes[nb] = copy_bandwidth(nb, device)
        r["copy_gbps"] = by_bytes[nb]
        r["frac_of_copy"] = r["achieved_gbps"] / r["copy_gbps"]
        r["device"] = name
    for ref_impl in ("eager", "compile"):
        base = {(r["method"], r["B"], r["C"], r["M"]): r["fwdbwd_ms"] for r in rows
                if r["impl"] == ref_impl}
        for r in rows:
            key = (r["method"], r["B"], r["C"], r["M"])
            r[f"speedup_vs_{ref_impl}"] = base.get(key, float("nan")) / r["fwdbwd_ms"]
    args.out.mkdir(parents=True, exist_ok=True)
    cols = ["device", "impl", "method", "B", "C", "M", "fwd_ms", "bwd_ms", "fwdbwd_ms",
            "speedup_vs_eager", "speedup_vs_compile", "peak_mem_mib", "min_bytes",
            "achieved_gbps", "copy_gbps", "frac_of_copy"]
    with open(args.out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    print(f"\ndevice: {name}; student {args.student_dtype}, mentors {args.mentor_dtype}")
    hdr = (f"{'impl':8} {'method':19} {'B':>5} {'C':>5} {'M':>2} {'fwd ms':>8} {'bwd ms':>8}"
           f" {'f+b ms':>8} {'xEager':>6} {'xComp':>6} {'peakMiB':>8} {'GB/s':>7} {'%copy':>6}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['impl']:8} {r['method']:19} {r['B']:5d} {r['C']:5d} {r['M']:2d} "
              f"{r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['fwdbwd_ms']:8.3f} "
              f"{r['speedup_vs_eager']:6.2f} {r['speedup_vs_compile']:6.2f} "
              f"{r['peak_mem_mib']:8.2f} {r['achieved_gbps']:7.2f} "
              f"{100 * r['frac_of_copy']:5.1f}%")
    plot(rows, args.out / "kernels.png", name)
    print(f"\nwrote {args.out / 'kernels.csv'} and {args.out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Static GPU evidence without a GPU: compile the loss kernels exactly as a launch would
(the same arguments, hence the same specialization) for an NVIDIA target with the ptxas
bundled in triton, and read the result: registers, spills, 128-bit global loads/stores
(PTX `ld.global.v4` / SASS `LDG.E.128`), the launches per loss call (`grid`: programs per
launch) and the bytes a row moves (`row_traffic`: to and from HBM, and re-read from L2).

    TRITON_INTERPRET= python benchmarks/static.py --arch 90 --C 100 1000

Run it with TRITON_INTERPRET unset (the kernels must be JIT functions, not the
interpreter's); nothing is launched: `launch.run` is replaced by a recorder. The mentor
logits come, by default, from the trainer's own path: a logit cache built here and read
by `CachedMentors.gather` (zarr needed; `--mentor-source plain` needs none).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from ckd.kernels.specialize import compile_launch, recorded_launches

CASES = {  # name -> distill_loss keyword arguments
    "classroom-batch": dict(method="classroom"),
    "classroom-sample": dict(method="classroom", granularity="sample"),
    "classroom-official": dict(method="classroom", variant="official"),
    "classroom-delta": dict(method="classroom", delta=0.5),
    "aver": dict(method="aver"), "kd": dict(method="kd"), "nokd": dict(method="nokd"),
    "dgkd": dict(method="dgkd", step=3), "tekap": dict(method="tekap", step=3),
    "dkd": dict(method="dkd", epoch=5),
}


MENTOR_SOURCES = ("cache", "plain")


@functools.lru_cache(maxsize=4)  # one store per shape for every case of a report
def cached_mentors(B: int, C: int, M: int, mentor=torch.float16) -> tuple:
    """(mentor logits [M, B, C], their stats, labels) exactly as the trainer gets them
    from a logit cache: `ckd.train.mentors.CachedMentors.gather` of a store built here
    (M random resnet8 mentors, B synthetic samples, one view) with `build_cache`."""
    from ckd.cache import build_cache, open_cache
    from ckd.data import load_dataset
    from ckd.models import create_model, save_checkpoint
    from ckd.train.mentors import CachedMentors

    dtype = {torch.float16: "fp16", torch.float32: "fp32"}[mentor]
    ds = load_dataset("synthetic", n_train=B, n_test=2, num_classes=C, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for m in range(M):
            torch.manual_seed(m)
            paths[f"m{m}"] = str(Path(tmp) / f"m{m}.pt")
            save_checkpoint(paths[f"m{m}"], create_model("resnet8", C), arch="resnet8",
                            num_classes=C, dataset="synthetic", metrics={})
        store = build_cache(ds, paths, Path(tmp) / "cache", views=1, dtype=dtype,
                            progress=False)
        source = CachedMentors(open_cache(store, mentors=list(paths)), seed=0)
        idx = torch.arange(B)
        slots, _ = source.views(0, idx)
        y = source.cache.labels[idx]  # the store's labels: the training split's
        zm, stats, _ = source.gather(slots, idx, None, (), y)
    return zm, stats, y


def loss_launches(case: str, B: int, C: int, M: int, student=torch.float32,
                  mentor=torch.float16, backward: bool = True, source: str = "cache") -> list:
    """The launches of one distill_loss forward (+ backward) on CPU tensors laid out as
    the trainer's: a contiguous student [B, C], mentors and their statistics from the
    trainer's cache gather (`source="cache"`: rows padded to 16 bytes) or, for
    comparison, a contiguous [M, B, C] tensor (`"plain"`: what an outside caller might
    pass)."""
    from ckd.mentor_stats import mentor_row_stats
    from ckd.methods import distill_loss

    zs = torch.randn(B, C).to(student).requires_grad_()
    if source == "cache":
        zm, stats, y = cached_mentors(B, C, M, mentor)
    elif source == "plain":
        zm = torch.randn(M, B, C).to(mentor)
        y = torch.randint(0, C, (B,))
        stats = mentor_row_stats(zm, y)
    else:
        raise ValueError(f"source must be one of {MENTOR_SOURCES}, got {source!r}")
    with recorded_launches() as calls:
        out = distill_loss(zs, zm, y, backend="triton", validate=False, mentor_stats=stats,
                           **CASES[case])
        if backward:
            out.loss.backward()
    return calls


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def inspect(compiled) -> dict:
    """Registers, spills and global load/store widths of a compiled kernel."""
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    arch = re.search(r"\.target sm_(\d+a?)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src, bin_ = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        bin_.write_bytes(cubin)
        for ptxas in ("ptxas-blackwell", "ptxas"):  # the one triton used for this PTX
            r = subprocess.run([_tool(ptxas), "-v", f"--gpu-name=sm_{arch}", str(src), "-o",
                                str(Path(tmp) / "v.cubin")], capture_output=True, text=True)
            if r.returncode == 0:
                break
        verbose = r.stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(bin_)], capture_output=True,
                              text=True, check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", verbose).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", verbose).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", verbose).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", verbose).group(1))
    return dict(
        regs=regs, stack=stack, spill_stores=spill_st, spill_loads=spill_ld,
        ptx_ld_v4=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
        ptx_ld_v2=len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.", ptx)),
        ptx_ld_scalar=len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b|u|f|s)(?:8|16|32|64)\b",
                                     ptx)),
        sass_ldg128=len(re.findall(r"LDG\.E\.128", sass)),
        sass_stg128=len(re.findall(r"STG\.E\.128", sass)),
    )


def row_traffic(kernel: str, kw: dict, C: int, student, mentor) -> tuple[int, int]:
    """(bytes a row moves to or from HBM, bytes it re-reads while they are in L2) of one
    loss launch, counted from its launch arguments (a model of the kernel's loads and
    stores: logit rows padded to 16 bytes as the cache stores them, the int64 label, the
    fp32 mentor statistics, the gradient written once; per-program partials included)."""
    s = torch.empty((), dtype=student).element_size()
    m = torch.empty((), dtype=mentor).element_size()
    g = 4 if student == torch.float16 else s
    padded = -(-C * m // 16) * 16  # one mentor row as the cache stores it
    if kernel == "_rank_batch_kernel":
        return C * s + 8 + 8 * kw["NM"], 0
    if kernel not in ("_terms_kernel", "_split_kernel", "_dkd_kernel"):
        return 0, 0  # _scale_kernel: in place, no traffic for an upstream gradient of 1
    nt = kw.get("NT", 1)
    prefix = kw.get("SRC_PREFIX", 1)
    mentors = (max(prefix, 1) if prefix >= 0 else nt) if nt else 0  # distinct rows read
    row = C * s + mentors * padded
    grad = C * g if kw["WRITE_GRAD"] else 0
    if kernel == "_split_kernel":  # once from HBM; the row's last program walks it again
        acc = 8 if str(kw["ACC"]) == "fp64" else 4
        return row + grad + 8 + 2 * kw["SPLIT"] * kw["NR"] * acc, row
    stats = 8 * kw["NM"] if kw.get("MODE") == 2 else 0
    passes = 1 if kw["ONE_BLOCK"] else 3
    return passes * row + grad + 8 + stats, 0


def report(cases, Cs, M: int, B: int, arch: int, student, mentor, source: str = "cache"
           ) -> list[dict]:
    rows = []
    for C in Cs:
        for case in cases:
            for kernel, grid, args, kwargs in loss_launches(case, B, C, M, student, mentor,
                                                            source=source):
                info = inspect(compile_launch((kernel, grid, args, kwargs), arch))
                keep = ("ROWS", "BLOCK_C", "BLOCK_T", "VEC_S", "VEC_M", "VEC_G", "VEC",
                        "num_warps")
                hbm, l2 = row_traffic(kernel.__name__, kwargs, C, student, mentor)
                rows.append(dict(case=case, B=B, C=C, M=M, kernel=kernel.__name__,
                                 grid=grid[0], **{k: kwargs[k] for k in keep if k in kwargs},
                                 **({"SPLIT": kwargs["SPLIT"]} if "SPLIT" in kwargs else {}),
                                 hbm_bytes_row=hbm, l2_bytes_row=l2, **info))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--C", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--M", type=int, default=6)
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--student", default="float32")
    ap.add_argument("--mentor", default="float16")
    ap.add_argument("--mentor-source", choices=MENTOR_SOURCES, default="cache",
                    help="cache: mentors gathered from a logit cache built here, as the "
                    "trainer reads them (padded rows); plain: a contiguous [M, B, C] tensor")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    rows = report(args.cases, args.C, args.M, args.B, args.arch, getattr(torch, args.student),
                  getattr(torch, args.mentor), args.mentor_source)
    if args.json:
        print(json.dumps(rows))
        return 0
    cols = ["case", "B", "C", "kernel", "grid", "ROWS", "SPLIT", "BLOCK_C", "num_warps",
            "VEC_S", "VEC_M", "VEC_G", "VEC", "regs", "stack", "spill_stores", "spill_loads",
            "ptx_ld_v4", "ptx_ld_scalar", "sass_ldg128", "sass_stg128", "hbm_bytes_row",
            "l2_bytes_row"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

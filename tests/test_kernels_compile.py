"""The Triton kernels compile for real GPUs (sm_80, sm_90: TTIR -> PTX -> cubin with the
ptxas bundled in triton) without a GPU. The interpreter runs the kernels' numerics on
CPU but is lenient about types; this catches what only the compiler would reject."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MAIN = dict(zs_ptr="*{s}", s_sb="i32", s_sc="i32", zm_ptr="*{m}", s_mm="i32", s_mb="i32",
            s_mc="i32", y_ptr="*i64", src_ptr="*i32", copy_ptr="*i32", w_ptr="*fp32",
            s_wj="i32", s_wb="i32", t_ptr="*fp32", s_tj="i32", s_tb="i32", wce_ptr="*fp32",
            s_wce="i32", grad_ptr="*{s}", s_gb="i32", loss_ptr="*{l}", flag_ptr="*i32",
            C="i32", J="i32", inv_B="fp32", root="i64", a="fp32", one_minus_a="fp32",
            BLOCK_C="constexpr", BLOCK_J="constexpr", NOISE="constexpr", ACC="constexpr",
            WRITE_GRAD="constexpr")
GT = dict(z_ptr="*{m}", s_k="i32", s_b="i32", s_c="i32", y_ptr="*i64", ce_ptr="*fp32",
          flag_ptr="*i32", B="i32", C="i32", FLAG_BIT="constexpr", BLOCK_C="constexpr",
          ACC="constexpr")
DKD = dict(zs_ptr="*{s}", s_sb="i32", s_sc="i32", zt_ptr="*{m}", s_tb="i32", s_tc="i32",
           y_ptr="*i64", grad_ptr="*{s}", s_gb="i32", loss_ptr="*{l}", flag_ptr="*i32",
           C="i32", inv_B="fp32", T="fp32", alpha_ce="fp32", w_tckd="fp32", w_nckd="fp32",
           BLOCK_C="constexpr", ACC="constexpr", WRITE_GRAD="constexpr")


RANK = dict(ce_ptr="*fp32", wkl_ptr="*fp32", temp_ptr="*fp32", wce_ptr="*fp32",
            st_ptr="*fp32", B="i32", M="i32", lam="fp32", tau="fp32", beta="fp32",
            delta="fp32", OFFICIAL="constexpr", SAMPLE="constexpr", BLOCK_K="constexpr",
            BLOCK_B="constexpr")


def compile_all(arch: int, full: bool) -> list[str]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ckd.kernels import distill as D

    target = GPUTarget("cuda", arch, 32)
    done = []
    combos = [("bf16", "fp16", 4096), ("fp64", "fp64", 128)]
    if full:
        combos += [("fp32", "bf16", 128), ("fp32", "fp32", 1024), ("bf16", "fp16", 128)]
    for s, m, blk in combos:
        acc = tl.float64 if s == "fp64" else tl.float32
        fmt = dict(s=s, m=m, l="fp64" if s == "fp64" else "fp32")
        warps = D._warps(blk)
        jobs = [
            (D._gt_ce_kernel, GT, dict(FLAG_BIT=2, BLOCK_C=blk, ACC=acc)),
            (D._dkd_kernel, DKD, dict(BLOCK_C=blk, ACC=acc, WRITE_GRAD=True)),
            *[(D._distill_kernel, MAIN, dict(BLOCK_C=blk, BLOCK_J=8, NOISE=noise, ACC=acc,
                                             WRITE_GRAD=grad))
              for noise in (False, True) for grad in (False, True)],
        ]
        for fn, sig, consts in jobs:
            sig = {k: v.format(**fmt) for k, v in sig.items()}
            k = triton.compile(ASTSource(fn, sig, consts), target=target,
                               options=dict(num_warps=warps))
            assert k.asm["cubin"], fn
            done.append(f"{fn.__name__}[{s}/{m}, BLOCK_C={blk}]")
    from ckd.kernels.rank import _rank_kernel

    for official, sample in ((False, False), (True, True)) + (((True, False), (False, True))
                                                              if full else ()):
        consts = dict(OFFICIAL=official, SAMPLE=sample, BLOCK_K=8, BLOCK_B=256)
        k = triton.compile(ASTSource(_rank_kernel, RANK, consts), target=target)
        assert k.asm["cubin"]
        done.append(f"_rank_kernel[official={official}, sample={sample}]")
    return done


def _compile(arch: int, full: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, __file__, str(arch), str(int(full))], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    n = (5 if full else 2) * 6 + (4 if full else 2)
    assert f"compiled {n} kernels" in r.stdout, r.stdout


def test_kernels_compile_for_h100():
    _compile(90, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_all_variants_slow(arch):
    _compile(arch, full=True)


if __name__ == "__main__":
    print(f"compiled {len(compile_all(int(sys.argv[1]), bool(int(sys.argv[2]))))} kernels")

"""The Triton kernels compile for real GPUs without a GPU (TTIR -> PTX -> cubin with the
ptxas bundled in triton), specialized exactly as a launch would specialize them
(`benchmarks/static.py` records the launches of a loss forward+backward and compiles each).
The interpreter runs the numerics on CPU but is lenient about types; this also checks
what only the compiled code shows: registers <= 128 with no spills, and 128-bit global
loads of the logit rows (cache rows padded to 16 bytes) at C=100 and C=1000."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LOSS_KERNELS = {"_terms_kernel", "_rank_batch_kernel", "_dkd_kernel"}
ROOT = Path(__file__).resolve().parent.parent


def compiled_env() -> dict:
    """The environment of a subprocess that compiles (no interpreter), importing this ckd."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def static_report(*argv: str) -> list[dict]:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static.py"), "--json",
                        *argv], env=compiled_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def compile_sweep(*argv: str) -> dict:
    script = str(Path(__file__).parent / "compile_sweep.py")
    r = subprocess.run([sys.executable, script, *argv], env=compiled_env(),
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_method_compiles_for_one_sample_and_unaligned_shapes():
    """Every registered fused method and variant (dense and sparse mentors, training
    layout) compiles for sm_90 at B = 1 (Triton turns the int into a constant) and B = 16
    (an alignment hint), C = 17: the shapes the interpreter cannot check."""
    out = compile_sweep("--B", "1", "16", "--C", "17", "--layouts", "fp32/fp16", "--sparse")
    assert out["launches"] > 0 and not out["failures"], out["failures"]


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ("--layouts", "fp32/fp16"),  # the training layout: every shape
    ("--layouts", "bf16/fp16", "fp32/bf16", "fp32/fp32", "fp16/fp16", "--B", "1", "4096",
     "--C", "17", "32000")], ids=["training-layout", "other-layouts"])
def test_compile_sweep_every_shape_and_layout_slow(argv):
    """method x variant x granularity x B in {1, 2, 16, 17, 4096} x C in {2, 16, 17, 32000}
    (32000: the class-blocked path) in the training layout (fp32 student, fp16 cache
    rows), the other dtype layouts at B in {1, 4096} x C in {17, 32000}; dense and sparse
    mentors; each distinct specialization compiled once (the full product of every layout
    is ~1600 compiles, ~55 min on 2 cores: `python tests/compile_sweep.py --sparse`)."""
    out = compile_sweep("--sparse", *argv)
    assert out["launches"] > 0 and not out["failures"], out["failures"]


def check(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        what = f"{r['kernel']} ({r['case']}, C={r['C']})"
        assert r["regs"] <= 128, f"{what}: {r['regs']} registers"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{what} spills"
        if r["kernel"] in LOSS_KERNELS:  # the logit rows: 128-bit loads in PTX and SASS
            assert r["ptx_ld_v4"] >= 1 and r["sass_ldg128"] >= 1, f"{what}: no 128-bit loads"


def test_classroom_compiles_for_h100_with_128_bit_loads():
    rows = static_report("--arch", "90", "--C", "100", "1000", "--cases", "classroom-batch")
    check(rows)
    assert {r["kernel"] for r in rows} == {"_rank_batch_kernel", "_terms_kernel",
                                           "_scale_kernel"}
    terms = [r for r in rows if r["kernel"] == "_terms_kernel"]
    # the mentors came from the trainer's cache gather: 16-byte rows, 8 fp16 per load
    assert all(r["VEC_M"] == 8 and r["VEC_S"] == 4 for r in terms), terms
    # every mentor tile and the student tile are 128-bit loads: no scalar loads of logits
    assert all(r["sass_ldg128"] >= 2 and r["sass_stg128"] >= 1 for r in terms), terms


def test_cache_gather_feeds_the_kernels_128_bit_rows_with_identical_results():
    """The trainer's cache gather (memory and stream mode) returns rows padded to 16 bytes
    (C=100 fp16: stride 104), the launcher picks 8-wide loads for them (a contiguous
    [M, B, 100] copy gets 1), and the gradient and selection are bit for bit those of the
    contiguous copy, the loss within 1 ulp (the copy's element-wise loads take fewer rows a
    program, so the batch sum's partials are grouped differently)."""
    pytest.importorskip("zarr")
    import torch

    from ckd.kernels.launch import vec_width
    from ckd.methods import distill_loss

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from static import cached_mentors, loss_launches

    zm, stats, y = cached_mentors(B=8, C=100, M=3)
    assert zm.shape == (3, 8, 100) and zm.stride() == (8 * 104, 104, 1)
    assert vec_width(zm, 100) == 8 and vec_width(zm.contiguous(), 100) == 1
    zs = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    outs = []
    for rows in (zm, zm.contiguous()):
        for granularity in ("batch", "sample"):
            z = zs.clone().requires_grad_()
            out = distill_loss(z, rows, y, backend="triton", granularity=granularity,
                               mentor_stats=stats)
            out.loss.backward()
            outs.append((out.loss, z.grad, out.stats["mentor_rank"], out.stats["mentor_active"]))
    for a, b in zip(outs[:2], outs[2:], strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=2.5e-7, atol=0)
        for x, w in zip(a[1:], b[1:], strict=True):
            assert torch.equal(x, w)
    vec_m = {src: loss_launches("kd", 8, 100, 3, source=src)[0][3]["VEC_M"]
             for src in ("cache", "plain")}
    assert vec_m == {"cache": 8, "plain": 1}


def test_stream_mode_gather_is_padded_too(tmp_path):
    pytest.importorskip("zarr")
    import torch

    from ckd.cache import build_cache, open_cache
    from ckd.data import load_dataset
    from ckd.models import create_model, save_checkpoint

    ds = load_dataset("synthetic", n_train=8, n_test=2, num_classes=100, seed=0)
    save_checkpoint(tmp_path / "t.pt", create_model("resnet8", 100), arch="resnet8",
                    num_classes=100, dataset="synthetic", metrics={})
    store = build_cache(ds, {"t": str(tmp_path / "t.pt")}, tmp_path / "c", views=2,
                        progress=False)
    idx = torch.arange(8)
    with open_cache(store) as mem, open_cache(store, mode="stream") as stream:
        slots, _ = mem.epoch_views(1, idx, seed=0)
        stream.start_epoch(1, 0, idx)
        a, b = mem.gather(slots, idx), stream.gather(slots, idx)
    assert a.stride(1) == b.stride(1) == 104 and torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_variant_compiles_slow(arch):
    check(static_report("--arch", str(arch), "--C", "100", "1000"))


@pytest.mark.slow
def test_unaligned_rows_fit_the_register_budget_slow():
    """A bf16 student at C=100 (the trainer's amp path: 200-byte rows) and contiguous
    fp16 mentors (an outside caller's) load element by element: fewer rows a program
    keep every variant within 128 registers and spill-free."""
    for argv in (("--student", "bfloat16"), ("--mentor-source", "plain")):
        rows = static_report("--arch", "90", "--C", "100", "1000", *argv)
        for r in rows:
            what = f"{r['kernel']} ({r['case']}, C={r['C']}, {argv})"
            assert r["regs"] <= 128, f"{what}: {r['regs']} registers"
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{what} spills"


def test_split_rows_compile_for_one_sample_and_a_large_batch():
    """The split-rows kernel (C > 4096) at B = 1 (a constant; 11 programs a row) and
    B = 4096 (one program a row), with a fixed table and with TeKAP's in-kernel noise."""
    out = compile_sweep("--B", "1", "4096", "--C", "32000", "--layouts", "fp32/fp16",
                        "--methods", "kd", "tekap")
    assert out["launches"] > 0 and not out["failures"], out["failures"]


@pytest.mark.slow
def test_large_vocabulary_targets_fit_the_register_budget_slow():
    """The issue's large-vocabulary cases (kd at B=4096, C=32000; classroom at B=1024,
    C=32000, M=3): rows split across programs, <= 128 registers, no spills, 128-bit loads
    (contiguous rows: 32000 fp16 are whole 16-byte groups, as the cache's padded rows)."""
    for argv in (("--B", "4096", "--M", "1", "--cases", "kd"),
                 ("--B", "1024", "--M", "3", "--cases", "classroom-batch")):
        rows = static_report("--arch", "90", "--C", "32000", "--mentor-source", "plain", *argv)
        check(rows)
        split = [r for r in rows if r["kernel"] == "_split_kernel"]
        assert len(split) == 1 and split[0]["grid"] == 4096, rows

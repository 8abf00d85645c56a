"""The Triton kernels compile for real GPUs without a GPU (TTIR -> PTX -> cubin with the
ptxas bundled in triton), specialized exactly as a launch would specialize them
(`ckd.kernels.static` records the launches of a loss forward+backward and compiles each).
The interpreter runs the numerics on CPU but is lenient about types; this also checks
what only the compiled code shows: registers <= 128 with no spills, and 128-bit global
loads of the logit rows (cache rows padded to 16 bytes) at C=100 and C=1000."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

LOSS_KERNELS = {"_terms_kernel", "_rank_batch_kernel", "_dkd_kernel"}


def static_report(*argv: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-m", "ckd.kernels.static", "--json", *argv],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    # every mentor tile and the student tile are 128-bit loads: no scalar loads of logits
    assert all(r["sass_ldg128"] >= 2 and r["sass_stg128"] >= 1 for r in terms), terms


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_variant_compiles_slow(arch):
    check(static_report("--arch", str(arch), "--C", "100", "1000"))

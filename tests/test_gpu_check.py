"""`make gpu-check` (scripts/gpu_check.sh) cannot run here (no GPU), so its shape is
checked on CPU: it parses, its dry run lists the steps it would run, every test file it
names exists, every flag it passes a benchmark is one that benchmark declares, and the
results land in ONE file under $OUT when that is a folder."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _dry_run(env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PY": sys.executable, **(env_extra or {})}
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _steps(text: str) -> list[list[str]]:
    lines = text.splitlines()
    return [shlex.split(lines[i + 1]) for i, line in enumerate(lines)
            if line.startswith("step ")]


def test_script_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_dry_run_lists_tests_and_benchmarks_that_exist():
    out = _dry_run()
    steps = _steps(out)
    assert len(steps) == 3, out
    limits = [int(m) for m in re.findall(r"\(limit (\d+) s\)", out)]
    budget = int(re.search(r"budget: (\d+) s", out).group(1))
    assert budget < 600 and sum(limits) <= budget + 60, (limits, budget)  # < 10 min
    tests = [a for a in steps[0] if a.startswith("tests/")]
    assert "CKD_TEST_DEVICE=cuda" in steps[0]
    assert {"tests/test_train_graphs.py", "tests/test_train_exactness.py",
            "tests/test_determinism.py"} <= set(tests)
    for t in tests:
        assert (ROOT / t).is_file(), t
    for step in steps[1:]:
        script = next(a for a in step if a.startswith("benchmarks/"))
        helptext = subprocess.run([sys.executable, script, "--help"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120).stdout
        for flag in (a for a in step if a.startswith("--")):
            assert flag in helptext, (script, flag)


def test_loss_benchmark_runs_every_target_case_side_by_side():
    """The loss step runs benchmarks/kernels.py --gpu-check: the issue's target cases,
    large vocabularies included (kd at B=4096, C=32000; classroom at B=1024, C=32000,
    M=3), in one run."""
    step = _steps(_dry_run())[1]
    assert "benchmarks/kernels.py" in step and "--gpu-check" in step
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernels import GPU_CHECK, METHODS

    assert {("kd", 4096, 32000, 1), ("classroom-paper", 1024, 32000, 3),
            ("classroom-paper", 256, 100, 6), ("classroom-paper", 4096, 1000, 6)} <= set(GPU_CHECK)
    assert {m for m, *_ in GPU_CHECK} <= set(METHODS)


def test_results_go_to_one_file_in_out(tmp_path):
    out = _dry_run({"OUT": str(tmp_path)})
    assert f"results file: {tmp_path}/gpu_check.md" in out
    assert "results file: benchmarks/out/gpu_check_" in _dry_run({"OUT": ""})


@pytest.mark.skipif(not Path(ROOT / ".whl").is_dir(), reason="no .whl/ prepared")
def test_dry_run_sees_the_wheels():
    assert "wheels from .whl/" in _dry_run()

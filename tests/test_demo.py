"""The demo end to end on real digits data with tiny epochs (slow: 801 s measured on 2 loaded cores;
the cache stage alone runs 4 mentors over all 162 views of 1347 images)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from ckd.demo import DEMO_METHODS, FEATURE_DEMO_METHODS, DemoPlan, run_demo


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 801 s measured on a loaded 2-core machine (pytest's default: 900)
def test_demo_runs_every_stage(tmp_path):
    plan = DemoPlan(teacher="r14", peers=("r8", "wrn-16-1", "sn-v2"), mentor_epochs=1,
                    student_epochs=1, seeds=(0, 1), more_students=("vit_tiny", "mamba_tiny"),
                    extra={"backend": "reference"})  # as `make demo` runs (no interpreter)
    summary = run_demo(tmp_path, plan)

    assert set(summary["mentor_acc"]) == {"r14", "r8", "wrn-16-1", "sn-v2"}
    saved = sorted(p.name for p in (tmp_path / "mentors" / "digits").glob("*.pt"))
    assert saved == ["ShuffleV2.pt", "resnet14.pt", "resnet8.pt", "wrn_16_1.pt"]
    root = zarr.open_group(str(tmp_path / "cache"), mode="r")
    assert root.attrs["views"]["num_slots"] == 162
    assert sorted(root["mentors"].group_keys()) == sorted(summary["mentor_acc"])
    for label, _, _ in DEMO_METHODS:
        rows = summary["results"][label]
        assert [r["seed"] for r in rows] == [0, 1]
        assert all(0.0 <= r["last"] <= 100.0 and r["best"] >= r["last"] for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {label} |" in table for label, _, _ in DEMO_METHODS)
    # `ckd demo --students`: kd and classroom rows for the student beyond CNNs, same cache
    for label in ("vit_tiny kd", "vit_tiny classroom (official)", "mamba_tiny kd",
                  "mamba_tiny classroom (official)"):
        assert f"| {label} |" in table and len(summary["results"][label]) == 2
        assert all(0.0 <= r["last"] <= 100.0 for r in summary["results"][label])
    for png in ("accuracy", "ranks", "temperatures", "methods"):
        data = (tmp_path / "report" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["results"] == summary["results"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 900 s was not enough on the loaded 2-core machine (all views)
def test_feature_demo_runs_every_feature_method(tmp_path):
    """`ckd demo --features`: a pooled-feature cache and fitnet, crd, tekap (F), tekap (F+L)
    and sdkd students next to nokd, kd and classroom (tiny epochs, one seed, two mentors,
    4 cached views instead of all 162: the full cache is what test_demo_runs_every_stage
    times)."""
    plan = DemoPlan.with_features(teacher="r14", peers=("r8",), mentor_epochs=1,
                                  student_epochs=1, seeds=(0,), cache_views=4,
                                  method_params={"crd.nce_k": 64, "tekap-f.nce_k": 64},
                                  extra={"backend": "reference"})
    summary = run_demo(tmp_path, plan)
    root = zarr.open_group(str(tmp_path / "cache"), mode="r")
    for alias in ("r14", "r8"):
        assert root[f"mentors/{alias}"].attrs["features"] == {"pool": [64]}
    table = (tmp_path / "results.md").read_text()
    for label, _, _ in FEATURE_DEMO_METHODS:
        assert f"| {label} |" in table
        [row] = summary["results"][label]
        assert 0.0 <= row["last"] <= 100.0
    run = json.loads((tmp_path / "runs" / "crd-s0" / "metrics.jsonl").read_text()
                     .splitlines()[0])
    assert run["method_modules"]["params"] > 0 and run["mentor_source"] == "cache"


# ------------------------------------------------------------------ README == `make demo`
README = Path(__file__).resolve().parents[1] / "README.md"
MAKE_DEMO_MARK = "What `make demo` printed"


def readme_demo_table() -> str:
    """The fenced block after the README's "What `make demo` printed" paragraph."""
    text = README.read_text()
    start = text.index("```\n", text.index(MAKE_DEMO_MARK)) + 4
    return text[start:text.index("```", start)].strip()


def without_times(table: str) -> list[str]:
    """The table's lines without the "s per run" column (wall time, not a result)."""
    return [line.rsplit("|", 2)[0] if line.startswith("|") else line
            for line in table.strip().splitlines()]


def printed_table(stdout: str) -> str:
    start = stdout.index("Student ")
    return stdout[start:stdout.index("\n\n[demo]", start)].strip()


def test_readme_demo_table_is_the_recorded_demo_output():
    recorded = (README.parent / "docs" / "demo" / "results.md").read_text().strip()
    assert readme_demo_table() == recorded


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the whole `make demo`, twice (the second run reuses the first)
def test_make_demo_prints_the_readme_table(tmp_path):
    """`make demo` runs `ckd demo --out demo_out`: its table is the README's to the last
    digit (times aside) where torch, its thread count and the CPU's instruction set are
    the README run's (the table's first line names them), and a second run into the same
    folder prints the same table."""
    from ckd.demo import numerics

    readme = readme_demo_table()
    mine = numerics(DemoPlan().threads)  # what `ckd demo` pins, not pytest's thread count
    if not readme.splitlines()[0].endswith(mine):
        pytest.skip(f"the README's table was printed with other numerics ({readme.splitlines()[0]}"
                    f"); here: {mine}")
    cmd = [sys.executable, "-m", "ckd.cli.main", "demo", "--out", str(tmp_path / "demo_out")]
    # as `make demo` runs: without the test run's TRITON_INTERPRET (the automatic backend
    # would take the interpreted kernels: other numerics) and OMP_NUM_THREADS
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("TRITON_INTERPRET", "OMP_NUM_THREADS")},
           "PYTHONPATH": str(README.parent)}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert without_times(printed_table(first.stdout)) == without_times(readme)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert "finished stages are reused" in again.stdout
    assert printed_table(again.stdout) == printed_table(first.stdout)  # times too: reused


@pytest.mark.slow
def test_a_second_demo_into_the_same_folder_reuses_the_first(tmp_path):
    """A rerun reuses finished mentors, cache and runs (same table, times included); a run
    with another thread count is refused (it would label the first run's digits as its own)."""
    plan = DemoPlan(teacher="r14", peers=("r8",), mentor_epochs=1, student_epochs=1,
                    seeds=(0,), cache_views=2, methods=DEMO_METHODS[:2],
                    extra={"backend": "reference"})
    first = run_demo(tmp_path, plan)
    table = (tmp_path / "results.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "mentors").rglob("*.pt")}
    again = run_demo(tmp_path, plan)
    assert (tmp_path / "results.md").read_text() == table
    assert again["results"] == first["results"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not retrained
    with pytest.raises(FileExistsError, match="1 thread.*2 threads.*same --threads"):
        run_demo(tmp_path, DemoPlan(**{**plan.__dict__, "threads": 2}))

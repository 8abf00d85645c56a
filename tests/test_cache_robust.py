"""Logit cache robustness: kill -9 + resume gives a byte-identical store, adding a mentor
computes only it, changed checkpoints / other data are refused, 2-rank torchrun sharding
writes the same bytes as one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckd.cache import CacheMismatchError, build_cache, open_cache
from ckd.data import load_dataset
from ckd.models import create_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    diff = [k for k in ta if ta[k] != tb[k]]
    assert not diff, f"files differ: {diff[:10]}"


def mentor(path: Path, seed: int, num_classes: int = 5, arch: str = "resnet8") -> Path:
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=num_classes)
    save_checkpoint(path, model, arch=arch, num_classes=num_classes, dataset="synthetic",
                    metrics={})
    return path.resolve()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckd.cli.main", "cache-logits", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mentors")
    return {"r8": mentor(tmp / "r8.pt", 0), "r8b": mentor(tmp / "r8b.pt", 1),
            "r8c": mentor(tmp / "r8c.pt", 2), "other": mentor(tmp / "r8_v2.pt", 3)}


def synthetic_cache_args(n: int, mentors: str, batch_size: int) -> list[str]:
    """`ckd cache-logits` arguments for a 2-view cache of an n-sample synthetic set."""
    return ["--dataset", "synthetic", "-D", f"n_train={n}", "-D", "n_test=16",
            "-D", "num_classes=5", "--mentors", mentors, "--views", "2",
            "--samples-per-chunk", "16", "--batch-size", str(batch_size), "--device", "cpu",
            "--quiet"]


def test_sigkill_then_resume_is_byte_identical(ckpts, tmp_path):
    n = 128
    args = synthetic_cache_args(n, f"r8={ckpts['r8']},r8b={ckpts['r8b']}", 16)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(*args, "--out", str(out)), env=env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = out / "mentors"  # unit_crc32c chunk files: one per finished work unit

    def finished() -> list[Path]:
        return [p for p in markers.glob("*/unit_crc32c/c/*/*/0") if p.is_file()]

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(finished()) >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in finished()}
    assert 3 <= len(done) < 2 * 2 * n // 16, "kill was not mid-way"
    # a temp file as a kill during a chunk write leaves it (zarr writes tmp + rename)
    (out / "mentors" / "r8" / "logits" / "c" / "0" / "0").mkdir(parents=True, exist_ok=True)
    (out / "mentors" / "r8" / "logits" / "c" / "0" / "0" / "0.1234abcd.partial").write_bytes(b"x")
    # the same command again finishes the job ...
    subprocess.run(cli(*args, "--out", str(out)), env=env(), cwd=tmp_path, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    # ... without recomputing finished chunks (marker files untouched) ...
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    # ... and the store equals an uninterrupted run, file for file, byte for byte.
    ds = load_dataset("synthetic", n_train=n, n_test=16, num_classes=5)
    clean = build_cache(ds, {"r8": ckpts["r8"], "r8b": ckpts["r8b"]}, tmp_path / "clean",
                        views=2, samples_per_chunk=16, batch_size=16, progress=False)
    assert_same_tree(out, clean)
    assert not list(out.rglob("*.partial"))


def test_add_mentor_computes_only_it(ckpts, tmp_path):
    ds = load_dataset("synthetic", n_train=64, n_test=8, num_classes=5)
    kw = dict(views=2, samples_per_chunk=16, progress=False)
    out = build_cache(ds, {"r8": ckpts["r8"]}, tmp_path / "inc", **kw)
    before = {p: p.stat().st_mtime_ns for p in (out / "mentors" / "r8").rglob("*")
              if p.is_file()}
    build_cache(ds, {"r8": ckpts["r8"], "r8b": ckpts["r8b"]}, out, **kw)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    both = build_cache(ds, {"r8": ckpts["r8"], "r8b": ckpts["r8b"]}, tmp_path / "both", **kw)
    assert_same_tree(out, both)
    assert open_cache(out).mentors == ["r8", "r8b"]


def test_changed_checkpoint_refused_unless_overwrite(ckpts, tmp_path):
    ds = load_dataset("synthetic", n_train=32, n_test=8, num_classes=5)
    kw = dict(views=1, samples_per_chunk=16, progress=False)
    out = build_cache(ds, {"r8": ckpts["r8"]}, tmp_path / "c", **kw)
    with pytest.raises(CacheMismatchError, match="sha256.*--overwrite"):
        build_cache(ds, {"r8": ckpts["other"]}, out, **kw)
    build_cache(ds, {"r8": ckpts["other"]}, out, overwrite=True, **kw)
    fresh = build_cache(ds, {"r8": ckpts["other"]}, tmp_path / "fresh", **kw)
    assert_same_tree(out, fresh)


def test_other_data_or_options_refused(ckpts, tmp_path):
    ds = load_dataset("synthetic", n_train=32, n_test=8, num_classes=5)
    kw = dict(samples_per_chunk=16, progress=False)
    out = build_cache(ds, {"r8": ckpts["r8"]}, tmp_path / "c", views=1, **kw)
    other = load_dataset("synthetic", n_train=32, n_test=8, num_classes=5, seed=1)
    with pytest.raises(CacheMismatchError, match="fingerprint.*--overwrite"):
        build_cache(other, {"r8": ckpts["r8"]}, out, views=1, **kw)
    with pytest.raises(CacheMismatchError, match="--views/--seed"):
        build_cache(ds, {"r8": ckpts["r8"]}, out, views=2, **kw)
    with pytest.raises(CacheMismatchError, match="--dtype"):
        build_cache(ds, {"r8": ckpts["r8"]}, out, views=1, dtype="fp32", **kw)
    ten = mentor(tmp_path / "ten.pt", 0, num_classes=10)
    with pytest.raises(ValueError, match="10"):
        build_cache(ds, {"r8": ten}, tmp_path / "c10", views=1, **kw)
    build_cache(other, {"r8": ckpts["r8"]}, out, views=1, overwrite=True, **kw)
    open_cache(out).check_compatible("synthetic", other.fingerprint, 5)
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not a logit cache"):
        build_cache(ds, {"r8": ckpts["r8"]}, tmp_path / "notacache", views=1, **kw)


def test_torchrun_two_ranks_byte_identical(ckpts, tmp_path):
    n = 96
    args = synthetic_cache_args(n, f"r8={ckpts['r8']},r8c={ckpts['r8c']}", 32)
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
           "ckd.cli.main", "cache-logits", *args, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ds = load_dataset("synthetic", n_train=n, n_test=16, num_classes=5)
    one = build_cache(ds, {"r8": ckpts["r8"], "r8c": ckpts["r8c"]}, tmp_path / "one",
                      views=2, samples_per_chunk=16, batch_size=32, progress=False)
    assert_same_tree(tmp_path / "two", one)

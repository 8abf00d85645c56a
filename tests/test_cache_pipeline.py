"""The pipelined cache build (ckd/cache/pipeline.py: writer threads with several units in
flight; on CUDA side-stream views and pinned non_blocking copies) writes the same store,
byte for byte, as the sequential build (`writers=0`: each unit written before the next is
computed): dense, sparse and feature caches here, image folders in test_image_cache.py;
a kill -9 with writes in flight resumes byte-identical (slow)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ckd.cache import build_cache
from ckd.cache.pipeline import HostRows, WritePool, prefetched
from ckd.data import load_dataset
from ckd.models import create_model, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_cache_robust import assert_same_tree, env  # noqa: E402

C = 5


@pytest.fixture(scope="module")
def mentors(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pipeline-mentors")
    out = {}
    for alias, arch, seed in (("r8", "resnet8", 0), ("r8b", "resnet8", 1)):
        torch.manual_seed(seed)
        out[alias] = tmp / f"{alias}.pt"
        save_checkpoint(out[alias], create_model(arch, C), arch=arch, num_classes=C,
                        dataset="synthetic", metrics={})
    return out


@pytest.mark.parametrize("kind", ["dense", pytest.param("all-views", marks=pytest.mark.slow),
                                  "sparse", "features", "bf16"])
def test_pipelined_build_equals_sequential_byte_for_byte(mentors, tmp_path, kind):
    n = 3 if kind == "all-views" else 24
    ds = load_dataset("synthetic", n_train=n, n_test=8, num_classes=C)
    kw = dict(views="all" if kind == "all-views" else 2, seed=2, batch_size=7,
              samples_per_chunk=2 if kind == "all-views" else 8, progress=False)
    if kind in ("all-views", "bf16"):  # 162 views x 3 samples; bf16 is slow on CPUs
        mentors = {"r8": mentors["r8"]}
    if kind == "sparse":
        kw["logits"] = "r8=topk:3,r8b=sample:4"
    if kind == "features":
        kw["features"] = "pool,map"
    if kind == "bf16":
        kw["precision"] = "bf16"
    seq = build_cache(ds, mentors, tmp_path / "seq", writers=0, **kw)
    piped = build_cache(ds, mentors, tmp_path / "piped", writers=3, **kw)
    assert_same_tree(seq, piped)


def test_write_pool_bounds_units_in_flight_and_reports_errors():
    running, peak, lock = [0], [0], threading.Lock()

    def write(i: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if i == 5:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), WritePool(2) as pool:
        for i in range(10):
            pool.submit(write, i)
            assert len(pool.pending) <= 2
    assert peak[0] == 2  # two writes really ran at once
    done = []
    with WritePool(0) as pool:  # sequential: in the calling thread, in order
        for i in range(3):
            pool.submit(lambda i=i: done.append((i, threading.current_thread().name)))
    assert done == [(i, threading.current_thread().name) for i in range(3)]


def test_host_rows_and_prefetch_on_cpu_keep_order():
    rows = HostRows((6, 2), torch.device("cpu"))
    for s, x in prefetched(lambda s: torch.full((2, 2), float(s)), range(0, 6, 2),
                           torch.device("cpu")):
        rows.put(s, x.to(torch.bfloat16))
    assert torch.equal(rows.ready().wait()[:, 0], torch.tensor([0., 0, 2, 2, 4, 4]))


_SLOW_WRITER = """
import sys, time
import ckd.cache.writer as writer
real = writer.UnitWriter.write
def slow(self, a, b, *rest):
    print(f"start {a} {b}", flush=True)
    time.sleep(0.15)  # compression/IO slower than the mentor: several units in flight
    real(self, a, b, *rest)
    print(f"end {a} {b}", flush=True)
writer.UnitWriter.write = slow
from ckd.cli.main import main
main(sys.argv[1:], prog_name="ckd")
"""


@pytest.mark.slow
def test_sigkill_with_writes_in_flight_resumes_byte_identical(mentors, tmp_path):
    n = 96
    args = ["cache-logits", "--dataset", "synthetic", "-D", f"n_train={n}", "-D", "n_test=8",
            "-D", f"num_classes={C}", "--mentors", f"r8={mentors['r8']}", "--views", "2",
            "--samples-per-chunk", "8", "--batch-size", "8", "--device", "cpu", "--quiet"]
    out = tmp_path / "killed"
    script = tmp_path / "slow_writer.py"
    script.write_text(_SLOW_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), *args, "--out", str(out)],
                            env=env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started, ended = set(), set()
    deadline = time.time() + 120
    for line in proc.stdout:  # kill once >= 3 units are done and others are mid-write
        what, *unit = line.split()
        if what not in ("start", "end"):
            continue  # the CLI's own output
        (started if what == "start" else ended).add(tuple(unit))
        if len(ended) >= 3 and len(started - ended) >= 2 or time.time() > deadline:
            break
    proc.kill()  # SIGKILL
    proc.wait()
    in_flight = started - ended
    assert len(ended) >= 3 and len(in_flight) >= 2, (started, ended)
    assert len(ended) < 2 * n // 8, "kill was not mid-way"
    subprocess.run([sys.executable, "-m", "ckd.cli.main", *args, "--out", str(out)],
                   env=env(), cwd=tmp_path, check=True, capture_output=True, timeout=300)
    ds = load_dataset("synthetic", n_train=n, n_test=8, num_classes=C)
    clean = build_cache(ds, {"r8": mentors["r8"]}, tmp_path / "clean", views=2,
                        samples_per_chunk=8, batch_size=8, progress=False, writers=0)
    assert_same_tree(out, clean)

"""The start of a cache build: the batch size (512 on CPU, filling the device on CUDA) and
the plan (mentors, views, rows, bytes, a timed warm-up's estimate) are printed, and the
progress bar counts mentor-images."""

from __future__ import annotations

import types

import pytest
import torch

from ckd.cache import build_cache
from ckd.cache.plan import auto_batch_size, plan_lines
from ckd.data import load_dataset
from ckd.models import create_model, save_checkpoint


def test_plan_and_progress_are_printed(tmp_path, capsys):
    ds = load_dataset("synthetic", n_train=24, n_test=8, num_classes=5)
    paths = {}
    for alias, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        paths[alias] = tmp_path / f"{alias}.pt"
        save_checkpoint(paths[alias], create_model("resnet8", 5), arch="resnet8",
                        num_classes=5, dataset="synthetic", metrics={})
    build_cache(ds, {"a": paths["a"]}, tmp_path / "c", views=2, precision="bf16",
                samples_per_chunk=8)
    out, err = capsys.readouterr()
    assert "plan: 1 mentor(s) x 2 views x 24 images = 48 rows each; batch 512 (default) " \
           "on cpu" in out
    assert "a (resnet8, bf16): " in out and "MiB raw, 48 rows to compute, warm-up " in out
    assert "img/s -> ~" in out and "estimated mentor time: ~" in out
    assert "mentor-img/s" in err  # the bar's rate (and its ETA)
    # adding a mentor: the cached one is said to be done, only the new one is timed
    build_cache(ds, paths, tmp_path / "c", views=2, precision="bf16", samples_per_chunk=8)
    out, _ = capsys.readouterr()
    assert "a (resnet8, bf16): " in out and "0 rows to compute (cached)" in out
    assert "b (resnet8, bf16): " in out and "48 rows to compute, warm-up" in out


def test_plan_lines_estimate_from_the_warmup_rate():
    lines = plan_lines({"r110": dict(arch="resnet110", precision="fp16", rows=8_100_000,
                                     bytes=1_620_000_000, rate=39_600.0)},
                       162, 50_000, 2048, "auto", torch.device("cpu"))
    assert "r110 (resnet110, fp16): 1545.0 MiB raw, 8100000 rows to compute" in lines[1]
    assert "39,600 img/s -> ~3.4 min" in lines[1]  # 8.1M / 39.6k = 204.5 s


@pytest.mark.parametrize("mib_per_image, total_gib, expect", [(10, 16, 512), (1, 141, 2048),
                                                               (600, 16, 8)])
def test_auto_batch_size_fills_half_the_device(monkeypatch, mib_per_image, total_gib, expect):
    """On CUDA: the largest power of two (up to 2048) whose measured activations fit in half
    the device's total memory (the CUDA calls are stood in for: no GPU here)."""
    state = {"alloc": 0, "peak": 0}
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=total_gib << 30))
    monkeypatch.setattr(cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda d=None: state["alloc"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda d=None: state["peak"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats",
                        lambda d=None: state.update(peak=state["alloc"]))

    def probe(n: int) -> None:
        state["peak"] = state["alloc"] + n * (mib_per_image << 20)

    size, why = auto_batch_size({"m": probe, "small": lambda n: None},
                                torch.device("cuda"))
    assert size == expect and f"{mib_per_image:.2f} MiB" in why
    assert auto_batch_size({"m": probe}, torch.device("cpu")) == (512, "default")

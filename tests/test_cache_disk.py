"""A cache build on a disk too small for it is refused before any mentor runs, and a write
that hits a full disk leaves no temp files and says how much the build needed."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest
import torch

from ckd.cache import writer
from ckd.cache.writer import build_cache
from ckd.data import load_dataset
from ckd.models import create_model, save_checkpoint

Usage = namedtuple("Usage", "total used free")


@pytest.fixture()
def setup(tmp_path):
    ds = load_dataset("synthetic", n_train=32, n_test=8, num_classes=10, seed=0)
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, create_model("resnet8", 10), arch="resnet8", num_classes=10,
                    dataset="synthetic", metrics={})
    return ds, {"resnet8": ckpt}, tmp_path / "cache"


def test_too_small_disk_is_refused_before_work(setup, monkeypatch):
    ds, mentors, out = setup
    ran = []
    monkeypatch.setattr(writer, "_run_mentor", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(OSError, match=r"still writes up to .* GiB .* only 0.00 GiB is free"):
        build_cache(ds, mentors, out, views=2, progress=False)
    assert not ran


def test_full_disk_mid_build_cleans_up_and_says_how_much(setup, monkeypatch):
    ds, mentors, out = setup

    def full(out_, *a, **k):
        (out_.local / "mentors" / "resnet8" / "x.partial").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_run_mentor", full)
    with pytest.raises(OSError, match=r"disk full while writing .* needed up to .* GiB more.*"
                                      r"rerun the same command"):
        build_cache(ds, mentors, out, views=2, progress=False)
    assert not list(out.rglob("*.partial"))

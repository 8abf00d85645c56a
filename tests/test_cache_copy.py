"""`ckd cache copy SRC DST`: local <-> object store (moto's S3 server on loopback), every
chunk's crc32c checked, resumable after an interruption, a damaged source refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckd.cache import build_cache, open_cache
from ckd.cache import copy as cache_copy
from ckd.cache.layout import CacheReadError
from ckd.data import load_dataset

sys.path.insert(0, str(Path(__file__).parent))
from test_cache_robust import env  # noqa: E402
from test_cache_s3 import local_tree, object_tree  # noqa: E402


@pytest.fixture()
def small_cache(s3_mentors, tmp_path) -> Path:
    ds = load_dataset("synthetic", n_train=64, n_test=16, num_classes=5)
    return build_cache(ds, {"r8": s3_mentors["r8"], "r8b": s3_mentors["r8b"]}, tmp_path / "src",
                       views=2, samples_per_chunk=16, progress=False)


def test_copy_to_s3_and_back_is_identical(s3, small_cache, tmp_path):
    url = f"{s3}/staged"
    rep = cache_copy.copy_cache(small_cache, url)
    assert rep.copied == rep.files == len(local_tree(small_cache))
    assert object_tree(url) == local_tree(small_cache)
    # back through the CLI, as a user stages a cache onto local disk
    back = tmp_path / "back"
    res = subprocess.run([sys.executable, "-m", "ckd.cli.main", "cache", "copy", url,
                          str(back), "--quiet"], env=env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "checksums and digests OK" in res.stdout
    assert local_tree(back) == local_tree(small_cache)
    idx = torch.arange(64)
    slots = torch.ones(64, dtype=torch.int64)
    assert torch.equal(open_cache(back).gather(slots, idx),
                       open_cache(small_cache).gather(slots, idx))
    again = cache_copy.copy_cache(url, back)  # nothing left to do but the root metadata
    assert again.copied == 1


def test_interrupted_copy_resumes_to_an_identical_store(small_cache, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    real_write, calls = cache_copy._write, []

    def dying_write(root, rel, data):
        if len(calls) == 7:
            raise KeyboardInterrupt("killed mid-copy")
        calls.append(rel)
        real_write(root, rel, data)

    monkeypatch.setattr(cache_copy, "_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        cache_copy.copy_cache(small_cache, dst)
    assert not (dst / "zarr.json").exists()  # not a readable cache until the copy finished
    with pytest.raises(FileNotFoundError, match="no logit cache"):
        open_cache(dst)
    monkeypatch.setattr(cache_copy, "_write", real_write)
    done = {rel: (dst / rel).stat().st_mtime_ns for rel in calls[1:]}  # [0]: the source id
    rep = cache_copy.copy_cache(small_cache, dst)
    assert rep.copied == rep.files - len(done)  # the files already there were kept
    assert all((dst / rel).stat().st_mtime_ns == t for rel, t in done.items())
    tree = local_tree(dst)
    assert tree == local_tree(small_cache)


def test_damaged_source_chunk_is_refused(small_cache, tmp_path):
    chunk = small_cache / "mentors" / "r8b" / "logits" / "c" / "1" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheReadError, match=f"{chunk}: fails its crc32c"):
        cache_copy.copy_cache(small_cache, tmp_path / "dst")
    assert not (tmp_path / "dst" / "mentors" / "r8b" / "logits" / "c" / "1" / "2" / "0"
                ).exists()


def test_copy_refuses_to_mix_two_caches(small_cache, s3_mentors, tmp_path):
    ds = load_dataset("synthetic", n_train=32, n_test=16, num_classes=5)
    other = build_cache(ds, {"r8": s3_mentors["r8"]}, tmp_path / "other", views=1,
                        progress=False)
    with pytest.raises(FileExistsError, match="already holds another cache"):
        cache_copy.copy_cache(small_cache, other)

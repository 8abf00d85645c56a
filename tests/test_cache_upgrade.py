"""`ckd cache upgrade`: a version-1 store (as ckd wrote it before format version 2) is
refused by every command with the upgrade command named, and upgrading it in place,
even after an interruption, gives exactly the store a version-2 build writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from zarr.storage import LocalStore

from ckd.cache import build_cache, open_cache
from ckd.cache.info import info, verify
from ckd.cache.layout import CacheIncompleteError, CacheMismatchError
from ckd.cli.main import main
from ckd.data import load_dataset
from ckd.models import create_model, save_checkpoint

N, C = 48, 5
KW = dict(views=3, seed=1, samples_per_chunk=16, batch_size=48, progress=False)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def write_v1(v2: Path, out: Path) -> Path:
    """The version-1 store of the same data: what ckd wrote before version 2 (labels,
    view_ids and train_correct with zarr's default codecs, no stats, no unit markers, no
    digests; train_correct was the completion marker)."""
    shutil.copytree(v2, out)
    src = zarr.open_group(str(v2), mode="r")
    store = LocalStore(out)
    for name in ("labels", "view_ids"):
        vals = src[name][:]
        shutil.rmtree(out / name)
        arr = zarr.create_array(store, name=name, shape=vals.shape, dtype=vals.dtype,
                                chunks=vals.shape if name == "labels" else (1, vals.shape[1]),
                                fill_value=-1)
        arr[...] = vals
    for mdir in sorted(p for p in (out / "mentors").iterdir() if p.is_dir()):
        base = f"mentors/{mdir.name}"
        correct = src[f"{base}/train_correct"]
        vals = correct[:]
        for name in ("stats", "unit_crc32c", "train_correct"):
            shutil.rmtree(mdir / name)
        arr = zarr.create_array(store, name=f"{base}/train_correct", shape=vals.shape,
                                chunks=correct.chunks, dtype="int32", fill_value=-1,
                                dimension_names=("slot", "block"),
                                config={"write_empty_chunks": True})
        arr[...] = vals
        meta = json.loads((mdir / "zarr.json").read_text())
        for key in ("arrays", "stat_fields"):
            meta["attributes"].pop(key)
        (mdir / "zarr.json").write_text(json.dumps(meta, indent=2))
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["version"] = 1
    meta["attributes"].pop("digests")
    (out / "zarr.json").write_text(json.dumps(meta, indent=2))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    ds = load_dataset("synthetic", n_train=N, n_test=8, num_classes=C)
    mentors = {}
    for seed, alias in enumerate(("r8", "r8b")):
        torch.manual_seed(seed)
        mentors[alias] = save_checkpoint(tmp / f"{alias}.pt", create_model("r8", C), arch="r8",
                                         num_classes=C, dataset="synthetic", metrics={})
    v2 = build_cache(ds, mentors, tmp / "v2", **KW)
    return dict(ds=ds, mentors=mentors, v2=v2)


def _cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_v1_refused_everywhere_naming_upgrade(built, tmp_path):
    v1 = write_v1(built["v2"], tmp_path / "v1")
    hint = f"ckd cache upgrade {v1}"
    for mode in ("memory", "stream"):
        with pytest.raises(CacheMismatchError, match=hint):
            open_cache(v1, mode=mode)
    for fn in (info, verify):
        with pytest.raises(CacheMismatchError, match=hint):
            fn(v1)
    with pytest.raises(CacheMismatchError, match=hint):
        build_cache(built["ds"], built["mentors"], v1, **KW)
    for args in (["cache", "info", v1], ["cache", "verify", v1]):
        res = _cli(*args)
        assert res.exit_code != 0 and hint in res.output and "Traceback" not in res.output


def test_upgrade_gives_the_v2_store_byte_for_byte(built, tmp_path):
    v1 = write_v1(built["v2"], tmp_path / "v1")
    res = _cli("cache", "upgrade", v1, "--quiet")
    assert res.exit_code == 0, res.output
    assert tree(v1) == tree(built["v2"])
    assert verify(v1).ok
    cache = open_cache(v1)
    idx = torch.arange(N)
    logits, stats = cache.gather(torch.full((N,), 2), idx, with_stats=True)
    ref, ref_stats = open_cache(built["v2"]).gather(torch.full((N,), 2), idx, with_stats=True)
    assert torch.equal(logits, ref) and torch.equal(stats, ref_stats)
    res = _cli("cache", "upgrade", v1)
    assert res.exit_code == 0 and "already" in res.output


def test_interrupted_upgrade_resumes(built, tmp_path, monkeypatch):
    import ckd.cache.upgrade as up

    v1 = write_v1(built["v2"], tmp_path / "v1")
    real, calls = up.unit_marker, []

    def dies_after_five(*a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt  # a kill mid-way through the second mentor's units
        return real(*a, **k)

    monkeypatch.setattr(up, "unit_marker", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        up.upgrade(v1)
    with pytest.raises(CacheMismatchError, match="ckd cache upgrade"):
        open_cache(v1)  # still version 1 until the root attributes are written last
    monkeypatch.setattr(up, "unit_marker", real)
    up.upgrade(v1)
    assert tree(v1) == tree(built["v2"])


def test_upgrade_of_a_v1_store_with_a_hole(built, tmp_path):
    """The version-1 fault: a deleted logits chunk read as zeros. Upgrading leaves that
    unit undone, the reader refuses the store, cache-logits rebuilds exactly it."""
    v1 = write_v1(built["v2"], tmp_path / "v1")
    (v1 / "mentors" / "r8b" / "logits" / "c" / "1" / "0" / "0").unlink()
    res = _cli("cache", "upgrade", v1, "--quiet")
    assert res.exit_code == 0 and "unit (1, 0)" in res.output and "cache-logits" in res.output
    with pytest.raises(CacheIncompleteError, match="r8b"):
        open_cache(v1)
    assert not verify(v1).ok
    build_cache(built["ds"], built["mentors"], v1, **KW)
    assert tree(v1) == tree(built["v2"])
    assert np.array_equal(zarr.open_group(str(v1), mode="r")["mentors/r8b/logits"][1],
                          zarr.open_group(str(built["v2"]), mode="r")["mentors/r8b/logits"][1])


def test_upgrade_finishes_an_interrupted_array_swap(built, tmp_path):
    """Killed between the two renames of an array swap: `labels` gone, the old array as
    `labels.replaced`, the complete new one as `labels.upgrade-new`."""
    v1 = write_v1(built["v2"], tmp_path / "v1")
    (v1 / "labels").rename(v1 / "labels.replaced")
    shutil.copytree(built["v2"] / "labels", v1 / "labels.upgrade-new")
    res = _cli("cache", "upgrade", v1, "--quiet")
    assert res.exit_code == 0, res.output
    assert tree(v1) == tree(built["v2"])

"""Cache format version 2: a store that cannot lie. Missing chunk files are holes (never
zeros), every array is checksummed and every unit matches its crc32c marker, the root
records digests of each mentor's metadata, read failures name the file and the repair,
mentor statistics are stored and served, version-1 stores are refused until
`ckd cache upgrade` converts them, one writer per store, and aliases match their arch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from ckd.cache import build_cache, open_cache
from ckd.cache.info import info, verify
from ckd.cache.layout import (
    MENTOR_ARRAYS,
    VERSION,
    CacheIncompleteError,
    CacheMismatchError,
    CacheReadError,
)
from ckd.cache.mentor_stats import STAT_FIELDS, mentor_row_stats
from ckd.cli.main import main
from ckd.data import load_dataset
from ckd.models import create_model, save_checkpoint

N, C = 48, 5
KW = dict(views=3, seed=1, samples_per_chunk=16, batch_size=48, progress=False)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _mentor(path: Path, seed: int, arch: str = "resnet8") -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, create_model(arch, num_classes=C), arch=arch, num_classes=C,
                    dataset="synthetic", metrics={})
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    ds = load_dataset("synthetic", n_train=N, n_test=8, num_classes=C)
    mentors = {"r8": _mentor(tmp / "r8.pt", 0), "r8b": _mentor(tmp / "r8b.pt", 1)}
    store = build_cache(ds, mentors, tmp / "store", **KW)
    return dict(tmp=tmp, ds=ds, mentors=mentors, store=store)


@pytest.fixture
def copy(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built["store"], out)
    return out


def _open_both(store: Path) -> None:
    """Open for training in both modes (stream reads happen at the first gather)."""
    open_cache(store, mode="memory")
    with open_cache(store, mode="stream") as st:
        idx = torch.arange(N)
        st.start_epoch(0, seed=0)
        st.gather(st.epoch_views(0, idx, seed=0)[0], idx)


def _cli(*args: str):
    return CliRunner().invoke(main, list(map(str, args)))


def test_v2_layout_declares_every_array(built):
    root = zarr.open_group(str(built["store"]), mode="r")
    assert root.attrs["version"] == VERSION == 2
    names = {s.name for s in MENTOR_ARRAYS}
    assert {"logits", "stats"} <= names
    for path in ["labels", "view_ids", *(f"mentors/r8/{n}" for n in names),
                 "mentors/r8/train_correct", "mentors/r8/unit_crc32c"]:
        codecs = [type(c).__name__ for c in root[path].compressors]
        assert codecs[-1] == "Crc32cCodec", (path, codecs)
    assert root["mentors/r8/stats"].shape == (3, N, len(STAT_FIELDS))
    assert set(root.attrs["digests"]["mentors"]) == {"r8", "r8b"}


def test_stats_are_the_stored_logits_stats(built):
    """stats = mentor_row_stats(stored logits, labels), bit for bit, served by gather in
    both modes."""
    root = zarr.open_group(str(built["store"]), mode="r")
    logits = torch.from_numpy(root["mentors/r8/logits"][:])
    labels = torch.from_numpy(built["ds"].train.labels)
    expect = mentor_row_stats(logits, labels)
    assert torch.equal(torch.from_numpy(root["mentors/r8/stats"][:]), expect)
    lse = torch.logsumexp(logits.double(), -1)
    assert torch.allclose(expect[..., STAT_FIELDS.index("logsumexp")].double(), lse)
    mem = open_cache(built["store"])
    idx = torch.tensor([0, 5, 17, 40])
    slots, _ = mem.epoch_views(2, idx, seed=1)
    lg, st = mem.gather(slots, idx, with_stats=True)
    assert st.dtype == torch.float32 and st.shape == (2, 4, len(STAT_FIELDS))
    assert torch.equal(st[0], expect[slots, idx])
    assert torch.equal(mentor_row_stats(lg, labels[idx]), st)  # online == cached
    with open_cache(built["store"], mode="stream") as stream:
        stream.start_epoch(2, seed=1)
        lg2, st2 = stream.gather(slots, idx, mentors=["r8b"], with_stats=True)
    assert torch.equal(lg2, lg[1:]) and torch.equal(st2, st[1:])


def test_deleted_logits_chunk_is_a_hole_not_zeros(built, copy):
    chunk = copy / "mentors" / "r8" / "logits" / "c" / "1" / "2" / "0"
    chunk.unlink()
    rep = verify(copy)
    assert not rep.ok and any(str(chunk) in p and "missing" in p for p in rep.problems)
    _, rows = info(copy)
    assert rows[0]["done_chunks"] == 8 and rows[0]["missing_files"] == 1
    for mode in ("memory", "stream"):
        with pytest.raises(CacheIncompleteError) as err:
            open_cache(copy, mode=mode)
        msg = str(err.value)
        assert "'r8'" in msg and str(chunk) in msg and "ckd cache-logits --out" in msg
    res = _cli("cache", "info", copy)
    assert res.exit_code == 0 and "8/9" in res.output and "missing" in res.output
    # the same cache-logits command rebuilds exactly that chunk: the store is whole again
    build_cache(built["ds"], built["mentors"], copy, **KW)
    assert tree(copy) == tree(built["store"])


def test_deleted_marker_or_stats_chunk_is_rebuilt(built, copy):
    (copy / "mentors" / "r8b" / "stats" / "c" / "0" / "1" / "0").unlink()
    (copy / "mentors" / "r8" / "unit_crc32c" / "c" / "2" / "2" / "0").unlink()
    assert not verify(copy).ok
    with pytest.raises(CacheIncompleteError):
        open_cache(copy)
    build_cache(built["ds"], built["mentors"], copy, **KW)
    assert tree(copy) == tree(built["store"]) and verify(copy).ok


@pytest.mark.parametrize("name", ["labels", "view_ids", "mentors/r8b/train_correct",
                                  "mentors/r8/stats"])
def test_flipped_bit_in_any_array_is_caught(copy, name):
    chunk = sorted((copy / name / "c").rglob("*"))[-1]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    rep = verify(copy)
    assert not rep.ok and any(str(chunk) in p for p in rep.problems), rep.problems
    with pytest.raises(CacheReadError, match="cannot read .*" + str(chunk)):
        _open_both(copy)


def test_swapped_chunks_are_caught(copy):
    """Two valid chunk files swapped (each passes its crc32c): the unit checksums differ."""
    a = copy / "mentors" / "r8" / "logits" / "c" / "0" / "0" / "0"
    b = copy / "mentors" / "r8" / "logits" / "c" / "0" / "1" / "0"
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb), b.write_bytes(ra)
    rep = verify(copy)
    assert not rep.ok and any("unit checksum" in p for p in rep.problems)
    for mode in ("memory", "stream"):
        with pytest.raises(CacheReadError, match="unit checksum"):
            _open_both(copy) if mode == "stream" else open_cache(copy)


def test_edited_mentor_attribute_is_caught(built, copy):
    meta_file = copy / "mentors" / "r8" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["test_acc"] = 99.9
    meta_file.write_text(json.dumps(meta))
    assert any("digest" in p for p in verify(copy).problems)
    with pytest.raises(CacheReadError, match="digest.*ckd cache verify"):
        open_cache(copy)
    build_cache(built["ds"], built["mentors"], copy, **KW)  # a rerun does not re-bless it
    with pytest.raises(CacheReadError, match="digest"):
        open_cache(copy)


@pytest.mark.parametrize("file", ["zarr.json", "mentors/r8/zarr.json",
                                  "mentors/r8/logits/zarr.json", "labels/zarr.json"])
def test_truncated_metadata_named_in_every_command(copy, file):
    meta = copy / file
    meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 2])
    for args in (["cache", "verify", copy], ["cache", "info", copy]):
        res = _cli(*args)
        assert res.exit_code != 0 and "Traceback" not in res.output, res.output
        assert str(meta) in res.output or "damaged" in res.output, res.output
    for mode in ("memory", "stream"):
        with pytest.raises((CacheReadError, CacheMismatchError)) as err:
            open_cache(copy, mode=mode)
        assert str(meta) in str(err.value)


def test_garbage_chunk_named_in_train_cli(built, copy):
    """A codec failure reaches `ckd train` as one line naming the chunk and the fix."""
    chunk = copy / "mentors" / "r8" / "logits" / "c" / "0" / "0" / "0"
    chunk.write_bytes(b"\x00" * 37)
    res = _cli("train", "--dataset", "synthetic", "-D", f"n_train={N}", "-D", "n_test=8",
               "-D", f"num_classes={C}", "--cache", copy, "--student", "resnet8",
               "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--no-progress",
               "--backend", "reference", "--out", copy.parent / "run")
    assert res.exit_code != 0, res.output
    assert str(chunk) in res.output and "cache-logits" in res.output
    assert "Traceback" not in res.output


def test_one_writer_per_store(built, copy):
    from ckd.cache.lock import StoreBusyError, writer_lock

    with writer_lock(copy, "test holder"):
        with pytest.raises(StoreBusyError, match=r"pid \d+: test holder"):
            build_cache(built["ds"], built["mentors"], copy, **KW)
        res = _cli("cache", "upgrade", copy)
        assert res.exit_code == 0 and "already" in res.output  # a v2 store: nothing to write
    build_cache(built["ds"], built["mentors"], copy, **KW)  # released: fine again
    assert tree(copy) == tree(built["store"])


def test_alias_of_another_arch_is_refused(built, tmp_path):
    with pytest.raises(ValueError, match="'r14' names resnet14 but .* is a resnet8"):
        build_cache(built["ds"], {"r14": built["mentors"]["r8"]}, tmp_path / "x", **KW)

"""Logit cache: store layout, bit-exactness against the mentors, reader modes, epoch views,
info/verify. Robustness (resume after SIGKILL, sharding, overwrite) is in
test_cache_robust.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from ckd.cache import CacheMismatchError, build_cache, open_cache
from ckd.cache.info import info, verify
from ckd.cache.mentors import resolve_mentors
from ckd.data import NUM_VIEWS, RECIPE, apply_views, load_dataset, view_ids
from ckd.hashing import epoch_seed
from ckd.models import create_model, save_checkpoint

N_TRAIN, N_TEST, C = 48, 16, 5


def make_mentor(path: Path, arch: str, seed: int, ds) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=ds.num_classes).eval()
    save_checkpoint(path, model, arch=arch, num_classes=ds.num_classes, dataset=ds.name,
                    metrics={})
    return model


def mentor_out(model: torch.nn.Module, ds, idx: torch.Tensor, vids: torch.Tensor
               ) -> torch.Tensor:
    with torch.no_grad():
        x = apply_views(torch.from_numpy(ds.train.images)[idx], vids, ds.mean, ds.std)
        return model(x)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    ds = load_dataset("synthetic", n_train=N_TRAIN, n_test=N_TEST, num_classes=C)
    models = {"r8": make_mentor(tmp / "r8.pt", "resnet8", 0, ds),
              "r8b": make_mentor(tmp / "r8b.pt", "resnet8", 1, ds)}
    keyed = build_cache(ds, {"r8": tmp / "r8.pt", "r8b": tmp / "r8b.pt"}, tmp / "keyed",
                        views=3, seed=5, dtype="fp32", batch_size=20, samples_per_chunk=16,
                        progress=False)
    # "all" views on a 6-sample subset of the data keeps this quick (162 x 6 images).
    small = load_dataset("synthetic", n_train=6, n_test=4, num_classes=C)
    allv = build_cache(small, {"r8": tmp / "r8.pt"}, tmp / "all", views="all", dtype="fp32",
                       batch_size=256, samples_per_chunk=4, progress=False)
    return dict(tmp=tmp, ds=ds, small=small, models=models, keyed=keyed, all=allv)


def test_store_layout_is_plain_zarr(setup):
    root = zarr.open_group(str(setup["keyed"]), mode="r")
    a = root.attrs.asdict()
    assert a["format"] == "ckd-logit-cache" and a["version"] == 2
    assert a["dataset"]["fingerprint"] == setup["ds"].fingerprint
    assert a["num_samples"] == N_TRAIN and a["num_classes"] == C
    assert a["views"]["recipe"] == RECIPE and a["views"]["mode"] == "keyed"
    assert a["views"]["seeds"] == [epoch_seed(5, k) for k in range(3)]
    assert a["normalization"]["mean"] == pytest.approx(list(setup["ds"].mean))
    np.testing.assert_array_equal(root["labels"][:], setup["ds"].train.labels)
    vid = root["view_ids"][:]
    assert vid.dtype == np.int16 and vid.shape == (3, N_TRAIN)
    for k in range(3):
        expect = view_ids(epoch_seed(5, k), torch.arange(N_TRAIN)).numpy()
        np.testing.assert_array_equal(vid[k], expect)
    lg = root["mentors/r8/logits"]
    assert lg.shape == (3, N_TRAIN, C) and lg.dtype == np.float32
    names = [type(c).__name__ for c in lg.compressors]
    assert names[-1] == "Crc32cCodec"
    m = root["mentors/r8"].attrs.asdict()
    assert m["arch"] == "resnet8" and m["complete"] is True and len(m["checkpoint_sha256"]) == 64
    assert len(m["train_acc_per_view"]) == 3 and 0 <= m["test_acc"] <= 100


def test_keyed_logits_bit_exact_vs_mentor(setup):
    cache = open_cache(setup["keyed"])
    assert cache.mentors == ["r8", "r8b"]
    idx = torch.arange(N_TRAIN)
    for epoch in range(4):
        slots, vids = cache.epoch_views(epoch, idx, seed=123)  # seed ignored when keyed
        assert (slots == epoch % 3).all()
        np.testing.assert_array_equal(
            vids.numpy(), view_ids(epoch_seed(5, epoch % 3), idx).numpy())
        got = cache.gather(slots, idx)
        assert got.shape == (2, N_TRAIN, C) and got.dtype == torch.float32
        for j, name in enumerate(cache.mentors):
            ref = mentor_out(setup["models"][name], setup["ds"], idx, vids)
            assert torch.equal(got[j], ref), name


def test_all_views_slot_is_view_and_bit_exact(setup):
    small = setup["small"]
    cache = open_cache(setup["all"])
    assert cache.num_slots == NUM_VIEWS and not cache.keyed
    idx = torch.arange(6)
    for v in (0, 1, 80, 161):
        got = cache.gather(torch.full((6,), v), idx)[0]
        ref = mentor_out(setup["models"]["r8"], small, idx, torch.full((6,), v))
        assert torch.equal(got, ref), v
    # epoch views: keyed hash of (seed mix, index); slot == view id; varies by epoch
    s0, v0 = cache.epoch_views(0, idx, seed=3)
    s1, _ = cache.epoch_views(1, idx, seed=3)
    assert torch.equal(s0, v0) and torch.equal(v0, view_ids(epoch_seed(3, 0), idx))
    assert not torch.equal(s0, s1)
    ref = mentor_out(setup["models"]["r8"], small, idx, v0)
    assert torch.equal(cache.gather(s0, idx)[0], ref)


def test_keyed_epochs_match_all_views_epochs(setup, tmp_path):
    """Epoch e < K of a K-view cache seeded s = epoch e of an 'all' cache run with seed s:
    same views, same logits."""
    small = setup["small"]
    keyed = build_cache(small, {"r8": setup["tmp"] / "r8.pt"}, tmp_path / "k2", views=2,
                        seed=3, dtype="fp32", progress=False)
    kc, ac = open_cache(keyed), open_cache(setup["all"])
    idx = torch.arange(6)
    for epoch in range(2):
        ks, kv = kc.epoch_views(epoch, idx, seed=3)
        as_, av = ac.epoch_views(epoch, idx, seed=3)
        assert torch.equal(kv, av)
        assert torch.equal(kc.gather(ks, idx), ac.gather(as_, idx))


@pytest.mark.parametrize("which", ["keyed", "all"])
def test_stream_equals_memory(setup, which):
    path = setup[which]
    mem = open_cache(path, mode="memory")
    n = mem.num_samples
    with open_cache(path, mode="stream") as st:
        for epoch in range(3):
            st.start_epoch(epoch, seed=11)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            for batch in perm.split(7):
                slots, _ = mem.epoch_views(epoch, batch, seed=11)
                a, b = mem.gather(slots, batch), st.gather(slots, batch)
                assert torch.equal(a, b)
                assert torch.equal(mem.gather(slots, batch, mentors=["r8"]),
                                   st.gather(slots, batch, mentors=["r8"]))
        wrong = (slots + 1) % mem.num_slots
        with pytest.raises(ValueError, match="planned slots"):
            st.gather(wrong, batch)


def test_stream_subset_plan_and_explicit_plan(setup):
    mem = open_cache(setup["keyed"])
    with open_cache(setup["keyed"], mode="stream", mentors=["r8b"]) as st:
        mine = torch.arange(0, N_TRAIN, 2)  # e.g. this rank's half
        st.start_epoch(4, seed=0, indices=mine)
        slots, _ = st.epoch_views(4, mine, seed=0)
        assert torch.equal(st.gather(slots, mine), mem.gather(slots, mine, mentors=["r8b"]))
        idx = torch.tensor([3, 40, 17])
        sl = torch.tensor([2, 0, 1])
        st.plan_epoch(sl, idx)
        assert torch.equal(st.gather(sl, idx), mem.gather(sl, idx, mentors=["r8b"]))


def test_reader_errors(setup, tmp_path):
    with pytest.raises(KeyError, match="not in"):
        open_cache(setup["keyed"], mentors=["r110"])
    with pytest.raises(FileNotFoundError, match="cache-logits"):
        open_cache(tmp_path / "nope")
    st = open_cache(setup["keyed"], mode="stream")
    with pytest.raises(RuntimeError, match="start_epoch"):
        st.gather(torch.tensor([0]), torch.tensor([0]))
    st.close()
    cache = open_cache(setup["keyed"])
    ds = setup["ds"]
    cache.check_compatible("synthetic", ds.fingerprint, C)  # matches: no error
    with pytest.raises(CacheMismatchError, match="fingerprint.*class count"):
        cache.check_compatible("synthetic", "0" * 16, 10)
    with pytest.raises(CacheMismatchError, match="dataset name"):
        cache.check_compatible("cifar100", None, None)


def test_info_and_verify(setup, tmp_path):
    import shutil

    attrs, rows = info(setup["keyed"])
    assert [r["alias"] for r in rows] == ["r8", "r8b"]
    assert all(r["complete"] and r["done_chunks"] == r["total_chunks"] == 9 for r in rows)
    assert rows[0]["raw_bytes"] == 3 * N_TRAIN * C * 4 and rows[0]["bytes"] > 0
    rep = verify(setup["keyed"], recompute=10, dataset=setup["ds"])
    assert rep.ok, rep.problems
    # labels, view_ids, then per mentor and unit: logits, stats, train_correct
    assert rep.chunks_read == 2 + 2 * 9 * 3 and rep.rows_recomputed == 20
    assert rep.max_abs_diff == 0.0
    # corrupt one byte of one chunk: the crc32c codec catches it
    bad = tmp_path / "bad"
    shutil.copytree(setup["keyed"], bad)
    chunk = bad / "mentors" / "r8" / "logits" / "c" / "1" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    rep = verify(bad)
    assert not rep.ok and any(f"cannot read {chunk}" in p for p in rep.problems)
    # non-finite values (written through zarr: checksums match) and a missing chunk file
    bad2 = tmp_path / "bad2"
    shutil.copytree(setup["keyed"], bad2)
    arr = zarr.open_array(str(bad2 / "mentors" / "r8b" / "logits"), mode="r+")
    arr[0, 0:16, :] = np.full((16, C), np.nan, dtype=np.float32)
    (bad2 / "mentors" / "r8b" / "train_correct" / "c" / "2" / "1").unlink()
    rep = verify(bad2)
    assert any("non-finite" in p for p in rep.problems)
    assert any("r8b/train_correct/c/2/1: missing chunk file" in p for p in rep.problems)


def test_resolve_mentors_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        resolve_mentors("nosuchnet", "synthetic", tmp_path)
    got = resolve_mentors("r110,r8=x.pt", "cifar100", tmp_path)
    assert got == {"r110": tmp_path / "cifar100" / "resnet110.pt", "r8": Path("x.pt")}
    with pytest.raises(FileNotFoundError, match="ckd train-mentor --arch r110"):
        build_cache(setup["ds"], got, tmp_path / "c", views=1, progress=False)
    with pytest.raises(ValueError, match="'all' or a positive int"):
        build_cache(setup["ds"], {"r8": setup["tmp"] / "r8.pt"}, tmp_path / "c", views="0",
                    progress=False)


def test_cli_info_verify_and_errors(setup, tmp_path):
    from click.testing import CliRunner

    from ckd.cli.main import main

    run = CliRunner().invoke
    res = run(main, ["cache", "info", str(setup["keyed"])])
    assert res.exit_code == 0, res.output
    assert "r8b" in res.output and "resnet8" in res.output and "9/9" in res.output
    res = run(main, ["cache", "verify", str(setup["keyed"]), "--recompute", "4"])
    assert res.exit_code == 0 and "OK" in res.output and "rows recomputed: 8" in res.output
    res = run(main, ["cache-logits", "--dataset", "synthetic", "--mentors", "nosuchnet",
                     "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "valid names" in res.output and "resnet110" in res.output
    res = run(main, ["cache-logits", "--dataset", "synthetic", "--mentors", "r110",
                     "--mentor-dir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "ckd train-mentor --arch r110" in res.output


def test_bad_mentor_output_stops_the_build(setup, tmp_path):
    ds = setup["small"]
    for name, scale, err, match in (("huge", 1e7, OverflowError, "--dtype fp32"),
                                    ("nan", float("nan"), FloatingPointError, "non-finite")):
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=ds.num_classes).eval()
        with torch.no_grad():
            model.fc.weight.mul_(scale)
        save_checkpoint(tmp_path / f"{name}.pt", model, arch="resnet8",
                        num_classes=ds.num_classes, dataset=ds.name, metrics={})
        with pytest.raises(err, match=match):
            build_cache(ds, {"m": tmp_path / f"{name}.pt"}, tmp_path / f"cache-{name}",
                        views=1, dtype="fp16", progress=False)


def test_build_reads_each_mentor_checkpoint_once_and_loads_it_once(setup, tmp_path,
                                                                   monkeypatch):
    """One load per mentor per build (its run and its test accuracy share the model), and
    the checkpoint file read twice at most (its recorded arch, then its weights)."""
    import ckd.cache.writer as writer
    import ckd.models.checkpoint as ckpt

    loads, reads = [], []
    real_load, real_read = writer.load_mentor, ckpt._torch_load
    monkeypatch.setattr(writer, "load_mentor", lambda *a: loads.append(a[0]) or real_load(*a))
    monkeypatch.setattr(ckpt, "_torch_load", lambda p: reads.append(p) or real_read(p))
    build_cache(setup["ds"], {"r8": setup["tmp"] / "r8.pt"}, tmp_path / "c", views=2,
                dtype="fp32", batch_size=20, samples_per_chunk=16, progress=False)
    assert loads == ["r8"] and len(reads) <= 2

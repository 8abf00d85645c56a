"""Mentor features in the cache: `--features pool[,map]` arrays beside the logits, equal
to the live `is_feat` forward, added to an existing store (only what is missing,
resumably), reported by info, checked by verify, refused by name when absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckd.cache import build_cache, open_cache
from ckd.cache.features import parse_features, plan_features
from ckd.data import load_dataset
from ckd.data.views import apply_views
from ckd.models import create_model, load_checkpoint, save_checkpoint

DS = dict(n_train=24, n_test=8, num_classes=10, seed=1)


@pytest.fixture(scope="module")
def mentors(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fmentors")
    out = {}
    for alias, arch, seed in (("t", "resnet14", 0), ("w", "wrn_16_1", 1)):
        torch.manual_seed(seed)
        model = create_model(arch, 10)
        with torch.no_grad():  # non-trivial BatchNorm statistics
            model.train()(torch.randn(32, 3, 32, 32))
        out[alias] = str(save_checkpoint(root / f"{alias}.pt", model, arch=arch,
                                         num_classes=10, dataset="synthetic", metrics={}))
    return out


def _ds():
    return load_dataset("synthetic", **DS)


def test_cached_features_equal_the_live_forward(mentors, tmp_path):
    ds = _ds()
    path = build_cache(ds, mentors, tmp_path / "c", views=3, dtype="fp32", progress=False,
                       features="pool,map")
    cache = open_cache(path, mentors=["t", "w"], features=("pool", "map"))
    assert cache.feature_shapes == {"pool": [(64,), (64,)], "map": [(64, 8, 8), (64, 8, 8)]}
    idx = torch.tensor([3, 0, 17, 9, 22])
    for epoch in (0, 1):
        slots, vids = cache.epoch_views(epoch, idx, seed=0)
        logits, feats = cache.gather_with_features(slots, idx, ("pool", "map"))
        x = apply_views(torch.from_numpy(ds.train.images[idx.numpy()]), vids, ds.mean, ds.std)
        for j, alias in enumerate(("t", "w")):
            model = load_checkpoint(mentors[alias]).eval()
            with torch.no_grad():
                stages, z = model(x.contiguous(), is_feat=True)
            assert torch.equal(logits[j].float(), z)  # fp32: bit for bit
            assert torch.equal(feats["pool"][j], stages[-1])
            assert torch.equal(feats["map"][j], stages[-2])


def test_features_added_to_a_logits_store_compute_only_what_is_missing(mentors, tmp_path,
                                                                       monkeypatch):
    import ckd.cache.writer as writer

    ds = _ds()
    path = build_cache(ds, mentors, tmp_path / "c", views=2, progress=False)
    logits_before = {a: open_cache(path, mentors=[a]).gather(torch.zeros(24, dtype=torch.long),
                                                           torch.arange(24)) for a in mentors}
    calls = []
    real = writer.launch_unit

    def counting(*args, **kw):
        calls.append(kw.get("features", ()))
        return real(*args, **kw)

    monkeypatch.setattr(writer, "launch_unit", counting)
    # interrupted while adding pool to mentor t: its first unit is written, then a crash
    real_write = writer.UnitWriter.write
    state = {"n": 0}

    def crash_after_one(self, *a, **kw):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_write(self, *a, **kw)

    monkeypatch.setattr(writer.UnitWriter, "write", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_cache(ds, {"t": mentors["t"]}, path, views=2, progress=False, features="pool",
                    samples_per_chunk=8)
    with pytest.raises(Exception, match="incomplete|--features|cache-logits"):
        open_cache(path, mentors=["t"], features=("pool",))
    monkeypatch.setattr(writer.UnitWriter, "write", real_write)
    n_before = len(calls)
    build_cache(ds, {"t": mentors["t"]}, path, views=2, progress=False, features="pool")
    resumed = calls[n_before:]
    assert resumed and all(f == ("pool",) for f in resumed)
    # mentor w was never asked for features: untouched, and refused for a feature method
    with pytest.raises(Exception, match=r"--features pool"):
        open_cache(path, mentors=["w"], features=("pool",))
    c = open_cache(path, mentors=["t"], features=("pool",))
    assert torch.equal(c.gather(torch.zeros(24, dtype=torch.long), torch.arange(24)),
                       logits_before["t"])  # the logits were redone identically
    # asking again computes nothing
    n_done = len(calls)
    build_cache(ds, {"t": mentors["t"]}, path, views=2, progress=False, features="pool")
    assert len(calls) == n_done


def test_info_and_verify_cover_the_feature_arrays(mentors, tmp_path):
    from ckd.cache.info import info, verify

    path = build_cache(_ds(), {"t": mentors["t"]}, tmp_path / "c", views=2, progress=False,
                       features="pool")
    _, rows = info(path)
    assert rows[0]["features"] == {"pool": [64]} and rows[0]["feature_bytes"] > 0
    from click.testing import CliRunner

    from ckd.cli.main import main

    res = CliRunner().invoke(main, ["cache", "info", str(path)])
    assert res.exit_code == 0 and "pool 64" in res.output, res.output
    assert verify(path).ok
    chunk = next((path / "mentors" / "t" / "pool" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    rep = verify(path)
    assert not rep.ok and any("pool" in p for p in rep.problems)


def test_size_is_printed_and_a_huge_map_suggests_fewer_views(mentors, capsys):
    class FakeSplit:
        images = np.zeros((50_000, 32, 32, 3), np.uint8)

        def __len__(self):
            return 50_000

    class FakeDS:
        train = FakeSplit()
        num_classes = 10

    from pathlib import Path

    shapes = plan_features(("pool", "map"), {"t": Path(mentors["t"])}, FakeDS(), 162,
                           "float16")
    assert shapes == {"t": {"pool": [64], "map": [64, 8, 8]}}
    out = capsys.readouterr().out
    assert "67." in out or "66." in out  # ~66 GB: 64x8x8 x 162 views x 50,000 x 2 B
    assert "warning" in out and "--views" in out
    assert parse_features("map,pool") == ("pool", "map")
    with pytest.raises(ValueError, match="unknown.*pool, map"):
        parse_features("pool,logits")


def test_feature_method_on_a_cache_without_features_names_the_flag(mentors, tmp_path):
    from ckd.train import train

    path = build_cache(_ds(), {"t": mentors["t"]}, tmp_path / "c", views=2, progress=False)
    with pytest.raises(Exception, match=r"cache-logits .*--features pool"):
        train(dict(dataset="synthetic", dataset_options=DS, student="resnet8",
                   method="kd+crd", cache=str(path), mentors=["t"], epochs=1, batch_size=8,
                   device="cpu", progress=False, out=str(tmp_path / "run")))


def test_stream_mode_serves_the_same_features_as_memory_mode(mentors, tmp_path):
    path = build_cache(_ds(), mentors, tmp_path / "c", views=3, dtype="fp16", progress=False,
                       features="pool,map")
    names = ("pool", "map")
    memory = open_cache(path, mentors=["t", "w"], features=names)
    with open_cache(path, mode="stream", mentors=["t", "w"], features=names) as stream:
        assert stream.feature_shapes == memory.feature_shapes
        for epoch in (0, 1, 2):
            stream.start_epoch(epoch, seed=4)
            order = torch.randperm(24, generator=torch.Generator().manual_seed(epoch))
            for idx in order.split(7):
                slots, _ = memory.epoch_views(epoch, idx, seed=4)
                z_mem, f_mem = memory.gather_with_features(slots, idx, names)
                z_str, f_str = stream.gather_with_features(slots, idx, names)
                assert torch.equal(z_mem, z_str)
                for name in names:
                    for a, b in zip(f_mem[name], f_str[name], strict=True):
                        assert b.dtype == torch.float32 and torch.equal(a, b), name


def test_verify_recompute_rederives_the_feature_arrays(mentors, tmp_path, monkeypatch):
    """A feature value stored wrong with consistent checksums (as a build bug would leave
    it) passes the checksum checks; `verify --recompute` re-runs the mentor and names the
    mentor and the array."""
    from click.testing import CliRunner

    import ckd.cache.writer as writer
    from ckd.cache.info import verify
    from ckd.cli.main import main

    real = writer.finish_unit

    def wrong_pool(*args, **kw):
        vals, correct, outputs = real(*args, **kw)
        outputs["pool"][:, :, 5] += 0.5  # one feature value of every row
        return vals, correct, outputs

    ds = _ds()
    good = build_cache(ds, {"t": mentors["t"]}, tmp_path / "good", views=2, dtype="fp32",
                       progress=False, features="pool,map")
    rep = verify(good, recompute=6, dataset=ds)
    assert rep.ok and rep.rows_recomputed == 6, rep.problems
    monkeypatch.setattr(writer, "finish_unit", wrong_pool)
    path = build_cache(ds, {"t": mentors["t"]}, tmp_path / "c", views=2, dtype="fp32",
                       progress=False, features="pool,map")
    monkeypatch.undo()
    assert verify(path).ok  # checksums match what was written
    res = CliRunner().invoke(main, ["cache", "verify", str(path), "--recompute", "6"])
    assert res.exit_code != 0
    assert "t/pool: 6/6 recomputed rows differ" in res.output, res.output
    assert "--mentors t=CHECKPOINT" in res.output
    assert "t/logits" not in res.output and "t/map" not in res.output


@pytest.mark.parametrize(("name", "stage"), [("pool", -1), ("map", -2)])
def test_cached_feature_shape_that_the_architecture_does_not_give_is_refused(
        mentors, tmp_path, monkeypatch, name, stage):
    """The cached pool/map shape is checked against the mentor architecture's own `is_feat`
    shapes before any module is built from it; a mismatch names the array, the mentor, both
    shapes and the rebuild command."""
    import re

    import ckd.train.features
    from ckd.train.features import cached_mentor_shapes

    path = build_cache(_ds(), {"t": mentors["t"]}, tmp_path / "c", views=1, progress=False,
                       features="pool,map")
    cache = open_cache(path, mentors=["t"], features=(name,))
    assert cached_mentor_shapes(cache, 32)[0][-1] == (64,)  # resnet14 at 32x32: consistent
    real = ckd.train.features.feature_shapes

    def other_width(arch, image_size):  # as if the architecture now gave another width
        shapes = list(real(arch, image_size))
        shapes[stage] = (32, *shapes[stage][1:])
        return shapes

    monkeypatch.setattr(ckd.train.features, "feature_shapes", other_width)
    cached = "(64,)" if name == "pool" else "(64, 8, 8)"
    with pytest.raises(ValueError, match=rf"holds {name} features of shape {re.escape(cached)} "
                       rf"for mentor 't', but its architecture resnet14 gives \(32,.*"
                       rf"--mentors t=CHECKPOINT --features {name} --overwrite"):
        cached_mentor_shapes(cache, 32)

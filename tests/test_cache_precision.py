"""Mentor precision (`ckd cache-logits --precision fp32|bf16|fp16`): recorded per mentor,
shown by `cache info`, used by `cache verify --recompute`, refused on mismatch naming the
flag, and online mentors run the same forward, so a bf16 cache equals bf16 online mentors
bit for bit (bf16 autocast runs on CPU too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from ckd.cache import CacheMismatchError, build_cache, open_cache
from ckd.cache.info import verify
from ckd.cache.mentors import load_mentor, recorded_precision
from ckd.cache.writer import record_mentor_digest
from ckd.data import apply_views, load_dataset
from ckd.models import create_model, save_checkpoint
from ckd.train import train
from ckd.train.mentors import OnlineMentors

DS_OPTS = dict(n_train=16, n_test=8, num_classes=10, seed=3)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("precision")
    ds = load_dataset("synthetic", **DS_OPTS)
    paths = {}
    for alias, seed in (("teacher", 1), ("peer", 2)):
        torch.manual_seed(seed)
        model = create_model("resnet8", ds.num_classes).eval()
        paths[alias] = tmp / f"{alias}.pt"
        save_checkpoint(paths[alias], model, arch="resnet8", num_classes=ds.num_classes,
                        dataset=ds.name, metrics={})
    cache = build_cache(ds, paths, tmp / "cache", views="all", dtype="fp32", precision="bf16",
                        batch_size=512, progress=False)
    return dict(tmp=tmp, ds=ds, paths=paths, cache=cache)


def test_bf16_cache_equals_bf16_online_mentors_bit_for_bit(bf16):
    ds, paths = bf16["ds"], bf16["paths"]
    cache = open_cache(bf16["cache"], mentors=["teacher", "peer"])
    models = [load_mentor(a, paths[a], ds.num_classes, torch.device("cpu"))
              for a in ("teacher", "peer")]
    online = OnlineMentors(models, ["teacher", "peer"], 0, None, "bf16")
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(ds.train), (12,), generator=gen)
    vids = torch.randint(0, 162, (12,), generator=gen)
    x = apply_views(torch.from_numpy(ds.train.images)[idx], vids, ds.mean, ds.std)
    got = online.logits(None, idx, x)
    assert got.dtype == torch.bfloat16  # autocast really ran
    stored = cache.gather(vids, idx)
    assert torch.equal(got.float(), stored.float())
    with torch.no_grad():  # and it is not the fp32 forward
        assert not torch.equal(models[0](x), stored[0].float())


def test_bf16_cached_training_equals_bf16_online_training(bf16):
    common = dict(dataset="synthetic", dataset_options=DS_OPTS, student="resnet8", epochs=1,
                  batch_size=8, log_every=1, progress=False, seed=5, device="cpu",
                  method="classroom", backend="reference")
    mentors = ["teacher", "peer"]
    cached = train(dict(common, cache=str(bf16["cache"]), mentors=mentors,
                        out=str(bf16["tmp"] / "cached")))
    # online mentors beside the cache default to its recorded precision
    beside = train(dict(common, cache=str(bf16["cache"]), mentors_online=True,
                        mentors=[f"{m}={bf16['paths'][m]}" for m in mentors],
                        out=str(bf16["tmp"] / "beside")))
    online = train(dict(common, mentors_online=True, mentor_precision="bf16",  # as --cache's
                        mentors=[f"{m}={bf16['paths'][m]}" for m in mentors],
                        out=str(bf16["tmp"] / "online")))

    def steps(run):
        lines = Path(run["run_dir"], "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["type"] == "step"]

    a, b = steps(cached), steps(online)
    assert len(a) == len(b) == 2 and a == b == steps(beside)
    for (k, p), q in zip(cached["model"].state_dict().items(),
                         online["model"].state_dict().values(), strict=True):
        assert torch.equal(p, q), k


def test_precision_recorded_shown_and_used_by_verify(bf16, monkeypatch):
    import ckd.cache.recompute as recompute
    from ckd.cli.main import main as cli

    root = zarr.open_group(str(bf16["cache"]), mode="r")
    assert root["mentors/teacher"].attrs["precision"] == "bf16"
    res = CliRunner().invoke(cli, ["cache", "info", str(bf16["cache"])])
    assert res.exit_code == 0 and "precision" in res.output and "bf16" in res.output
    seen = []
    real = recompute.mentor_forward
    monkeypatch.setattr(recompute, "mentor_forward",
                        lambda m, x, p="fp32", **k: seen.append(p) or real(m, x, p, **k))
    rep = verify(bf16["cache"], recompute=8, dataset=bf16["ds"])
    assert rep.ok, rep.problems
    assert rep.rows_recomputed == 16 and set(seen) == {"bf16"}


def test_precision_mismatch_refused_naming_the_flag(bf16, tmp_path):
    ds, paths = bf16["ds"], bf16["paths"]
    with pytest.raises(CacheMismatchError, match="--precision bf16"):
        build_cache(ds, paths, bf16["cache"], views="all", dtype="fp32", precision="fp32",
                    progress=False)
    base = dict(dataset="synthetic", dataset_options=DS_OPTS, student="resnet8", epochs=1,
                batch_size=8, progress=False, device="cpu", method="classroom",
                cache=str(bf16["cache"]))
    with pytest.raises(ValueError, match="--mentor-precision bf16"):  # online
        train(dict(base, mentors_online=True, mentor_precision="fp32", out=str(tmp_path / "a"),
                   mentors=[f"{m}={p}" for m, p in paths.items()]))
    with pytest.raises(ValueError, match="--mentor-precision bf16"):  # explicit, cached
        train(dict(base, mentor_precision="fp16", out=str(tmp_path / "b")))


def test_store_without_precision_reads_as_fp32(bf16, tmp_path):
    """A store built before precisions existed: its mentors are fp32 ones, resumed and
    added to at fp32, refused at bf16."""
    ds, paths = bf16["ds"], {"teacher": bf16["paths"]["teacher"]}
    small = load_dataset("synthetic", **{**DS_OPTS, "n_train": 4})
    out = build_cache(small, paths, tmp_path / "old", views=2, dtype="fp32", progress=False)
    grp = zarr.open_group(str(out), path="mentors/teacher", mode="r+")
    attrs = grp.attrs.asdict()
    del attrs["precision"]
    grp.attrs.put(attrs)
    record_mentor_digest(out, "teacher")
    before = (out / "mentors" / "teacher" / "zarr.json").read_bytes()
    assert recorded_precision(grp.attrs.asdict()) == "fp32"
    assert verify(out).ok
    build_cache(small, paths, out, views=2, dtype="fp32", progress=False)  # nothing to redo
    assert (out / "mentors" / "teacher" / "zarr.json").read_bytes() == before
    with pytest.raises(CacheMismatchError, match="--precision fp32"):
        build_cache(small, paths, out, views=2, dtype="fp32", precision="bf16",
                    progress=False)
    assert ds.num_classes == 10

"""Logit caches of random-resized-crop views on an image folder: boxes stored beside the
logits and equal to `rrc_views`, each mentor at its own resolution, cached == online
logits for the slots an epoch replays, `verify --recompute`, the CLI and resume."""

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from ckd.cache import build_cache, open_cache
from ckd.cache.mentors import load_mentor
from ckd.data.image_views import ImageViews
from ckd.data.rrc import epoch_slots, rrc_views
from ckd.data.views import normalize
from ckd.models import create_model, save_checkpoint

# Slow: four FFCV decoders compile (two resolutions x train/test) on top of the builds.
pytestmark = pytest.mark.slow
RES = {"r8": 32, "wrn": 40}  # resnet8's own 32 px; wrn_16_1 overridden to 40 px


@pytest.fixture(scope="module")
def built(prepared_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("rrc-cache")
    torch.manual_seed(0)
    paths = {}
    for alias, arch in (("r8", "resnet8"), ("wrn", "wrn_16_1")):
        paths[alias] = root / f"{arch}.pt"
        save_checkpoint(paths[alias], create_model(arch, 3), arch=arch, num_classes=3,
                        dataset="imagefolder", metrics=None)
    views = ImageViews(prepared_images, batch_size=8)
    out = build_cache(views, paths, root / "cache", views=2, seed=5, dtype="fp32",
                      samples_per_chunk=8, batch_size=8, resolutions={"wrn": 40},
                      progress=False)
    return dict(views=views, paths=paths, out=out, root=root)


def test_boxes_and_resolutions_are_stored(built):
    views, n = built["views"], len(built["views"].train)
    root = zarr.open_group(str(built["out"]), mode="r")
    assert root.attrs["views"]["recipe"]["name"] == "rrc-0.08-1-flip"
    assert root.attrs["views"]["seed"] == 5 and "view_ids" not in root
    hw = torch.from_numpy(views.train.orig_hw)
    expected = np.stack([rrc_views(5, torch.arange(n), k, hw[:, 0], hw[:, 1]).numpy()
                         for k in range(2)])
    for alias, res in RES.items():
        grp = root[f"mentors/{alias}"]
        assert grp.attrs["resolution"] == res and grp.attrs["complete"]
        assert grp["boxes"].dtype == np.uint16 and grp["boxes"].shape == (2, n, 5)
        assert np.array_equal(grp["boxes"][:].astype(np.int64), expected)
        assert 0 <= grp.attrs["test_acc"] <= 100


def test_cached_equals_online_for_the_replayed_slots(built):
    views, n = built["views"], len(built["views"].train)
    cache = open_cache(str(built["out"]), mode="memory")
    hw = torch.from_numpy(views.train.orig_hw)
    idx = torch.from_numpy(np.random.default_rng(1).permutation(n))  # another order
    for epoch in (0, 3):
        slots, _ = cache.epoch_views(epoch, idx, seed=11)
        assert torch.equal(slots, epoch_slots(11, epoch, idx, 2))
        cached = cache.gather(slots, idx)  # [M, B, C]
        for m, alias in enumerate(cache.mentors):
            model = load_mentor(alias, built["paths"][alias], 3, torch.device("cpu"))
            loader = views.loader("train", RES[alias])
            boxes = torch.empty((n, 5), dtype=torch.int64)
            for k in range(2):
                sel = idx[slots == k]
                boxes[sel] = rrc_views(5, sel, k, hw[sel, 0], hw[sel, 1])
            loader.set_boxes(idx, boxes[idx])
            online = torch.empty((n, 3))
            with torch.no_grad():
                for (imgs,), _, got in loader.iterate(idx.numpy()):
                    x = normalize(imgs, views.mean, views.std).permute(0, 3, 1, 2)
                    online[got] = model(x.contiguous())
            assert (cached[m].float() - online[idx]).abs().max() <= 1e-5, (alias, epoch)


def test_pipelined_build_equals_sequential_byte_for_byte(built, tmp_path):
    """The default build (writer threads, units in flight) wrote the bytes a sequential
    build (`writers=0`) writes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_cache_robust import assert_same_tree

    seq = build_cache(built["views"], built["paths"], tmp_path / "seq", views=2, seed=5,
                      dtype="fp32", samples_per_chunk=8, batch_size=8,
                      resolutions={"wrn": 40}, progress=False, writers=0)
    assert_same_tree(seq, built["out"])


def test_verify_recompute_rederives_boxes(built):
    from ckd.cache.info import verify

    rep = verify(built["out"], recompute=6, dataset=built["views"])
    assert rep.ok, rep.problems
    assert rep.rows_recomputed == 12 and rep.max_abs_diff <= 1e-5


def test_cli_views_all_refused_and_resume(built, prepared_images, tmp_path, monkeypatch):
    from ckd.cache import writer
    from ckd.cli.main import main

    args = ["cache-logits", "--prepared", str(prepared_images), "--mentors",
            f"wrn={built['paths']['wrn']}", "--out", str(tmp_path / "c"), "--dtype", "fp32",
            "--samples-per-chunk", "8", "--batch-size", "8", "--seed", "5",
            "--resolution", "wrn=40", "--quiet"]
    res = CliRunner().invoke(main, args)  # --views defaults to all
    assert res.exit_code != 0 and "--views K" in res.output
    res = CliRunner().invoke(main, [*args, "--views", "2", "--resolution", "nope=3"])
    assert res.exit_code != 0 and "nope" in res.output
    calls = []
    real = writer.UnitWriter.write

    def die_after_one(self, *a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(writer.UnitWriter, "write", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_cache(built["views"], {"wrn": built["paths"]["wrn"]}, tmp_path / "c", views=2,
                    seed=5, dtype="fp32", samples_per_chunk=8, batch_size=8,
                    resolutions={"wrn": 40}, progress=False)
    monkeypatch.setattr(writer.UnitWriter, "write", real)
    res = CliRunner().invoke(main, [*args, "--views", "2"])
    assert res.exit_code == 0, res.output
    a = zarr.open_group(str(tmp_path / "c"), mode="r")["mentors/wrn"]
    b = zarr.open_group(str(built["out"]), mode="r")["mentors/wrn"]
    for name in ("logits", "boxes", "stats"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert json.loads((tmp_path / "c" / "zarr.json").read_text())["attributes"]["views"][
        "seed"] == 5

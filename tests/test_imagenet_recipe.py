"""The ImageNet-style recipe on a small JPEG folder, through the CLI: mentors from the vision
ecosystem (torchvision and timm state_dicts) cached at their own resolution and
normalisation, `ckd eval` of a checkpoint, and online mentors equal to the cache."""

from __future__ import annotations

import json
import sys

import fake_timm
import pytest
import torch
import zarr
from click.testing import CliRunner

from ckd.models import create_model

# Slow: FFCV's replay decoder compiles per resolution.
pytestmark = pytest.mark.slow


def _ckd(*args: str):
    from ckd.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def vision_mentors(tmp_path, monkeypatch):
    """A torchvision-layout resnet18 and a timm ViT (the stand-in timm), random weights,
    saved as plain state_dicts."""
    monkeypatch.setitem(sys.modules, "timm", fake_timm.module())
    torch.manual_seed(0)
    tv = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", 3).state_dict(), tv)
    vit = tmp_path / "vit.pth"
    torch.save(fake_timm.create("test_vit", num_classes=3).state_dict(), vit)
    return {"tv": tv, "vit": vit}


def test_cache_logits_with_vision_mentors(prepared_images, vision_mentors, tmp_path):
    out = tmp_path / "cache"
    res = _ckd("cache-logits", "--prepared", prepared_images, "--mentors",
               f"tv=torchvision:resnet18:{vision_mentors['tv']},"
               f"vit=timm:test_vit:{vision_mentors['vit']}",
               "--resolution", "tv=64", "--views", "2", "--dtype", "fp32", "--batch-size", "8",
               "--device", "cpu", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output
    root = zarr.open_group(str(out), mode="r")
    tv, vit = (root[f"mentors/{a}"].attrs.asdict() for a in ("tv", "vit"))
    assert (tv["arch"], tv["resolution"]) == ("torchvision:resnet18", 64)  # the flag wins
    assert tv["mean"] == [0.485, 0.456, 0.406]  # torchvision's convention
    assert (vit["arch"], vit["resolution"], vit["mean"]) == ("timm:test_vit", 32,
                                                             [0.5, 0.5, 0.5])  # its cfg
    # the stored rows are what the recorded mentor computes on the re-derived boxes
    res = _ckd("cache", "verify", out, "--recompute", "6", "--prepared", prepared_images)
    assert res.exit_code == 0, res.output
    # a resolution the ViT cannot take: one line naming the fix
    res = _ckd("cache-logits", "--prepared", prepared_images, "--mentors",
               f"vit=timm:test_vit:{vision_mentors['vit']}", "--resolution", "vit=48",
               "--views", "1", "--device", "cpu", "--quiet", "--out", tmp_path / "c2")
    assert res.exit_code == 1 and "cannot take 48 px" in res.output
    assert "--resolution vit=PIXELS" in res.output


def test_eval_on_an_image_folder(prepared_images, vision_mentors, tmp_path):
    from ckd.data.image_views import ImageViews
    from ckd.data.images import ImageLoader
    from ckd.data.views import normalize

    out = tmp_path / "eval.jsonl"
    spec = f"torchvision:resnet18:{vision_mentors['tv']}"
    res = _ckd("eval", spec, "--prepared", prepared_images, "--resolution", "64",
               "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert (rec["split"], rec["resolution"], rec["arch"]) == ("val", 64,
                                                              "torchvision:resnet18")
    # the center crops at 64 px, normalised with torchvision's statistics
    views = ImageViews(prepared_images)
    loader = ImageLoader(prepared_images / "test.beton", [64], batch_size=64,
                         center_crop=True)
    (imgs,), labels, _ = next(iter(loader.iterate(torch.arange(len(views.test)).numpy())))
    model = create_model("resnet18", 3).eval()
    model.load_state_dict(torch.load(vision_mentors["tv"], weights_only=True))
    x = normalize(imgs, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).permute(0, 3, 1, 2)
    with torch.no_grad():
        pred = model(x.contiguous()).argmax(1)
    assert rec["images"] == len(labels)
    assert abs(rec["top1"] - 100.0 * float((pred == labels).float().mean())) < 1e-3
    # the timm ViT at its config's 32 px; a split the folder does not hold
    res = _ckd("eval", f"timm:test_vit:{vision_mentors['vit']}", "--prepared",
               prepared_images, "--device", "cpu", "--out", out)
    assert res.exit_code == 0 and json.loads(out.read_text().splitlines()[-1])[
        "resolution"] == 32
    res = _ckd("eval", spec, "--prepared", prepared_images, "--split", "holdout")
    assert res.exit_code == 1 and "--split 'holdout' is not in" in res.output


def test_cached_student_equals_online_student(prepared_images, vision_mentors, tmp_path):
    """The central guarantee on an image folder, through the CLI: a student trained from an
    fp32 cache of every view it replays equals, bit for bit on CPU, the student trained with
    the same mentors run online, each on the same box at its own resolution (resnet8 at
    40 px, a torchvision resnet18 at 48 px, the student at 36 px)."""
    from ckd.models import load_checkpoint

    torch.manual_seed(1)
    r8 = tmp_path / "r8.pt"
    from ckd.models import save_checkpoint

    save_checkpoint(r8, create_model("resnet8", 3), arch="resnet8", num_classes=3,
                    dataset="imagefolder", metrics=None)
    mentors = f"tv=torchvision:resnet18:{vision_mentors['tv']},r8={r8}"  # teacher first
    cache = tmp_path / "cache"
    res = _ckd("cache-logits", "--prepared", prepared_images, "--mentors", mentors,
               "--resolution", "r8=40", "--resolution", "tv=48", "--views", "2", "--dtype",
               "fp32", "--batch-size", "8", "--device", "cpu", "--quiet", "--out", cache)
    assert res.exit_code == 0, res.output
    common = ["--prepared", prepared_images, "--cache", cache, "--student", "resnet8",
              "--resolution", "36", "--method", "classroom", "--backend", "reference",
              "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--deterministic",
              "--no-progress", "--log-every", "1", "--seed", "3"]
    res = _ckd("train", *common, "--mentors", "tv,r8", "--out", tmp_path / "cached")
    assert res.exit_code == 0, res.output
    res = _ckd("train", *common, "--mentors-online", "--mentors", mentors, "--out",
               tmp_path / "online")
    assert res.exit_code == 0, res.output
    a = load_checkpoint(tmp_path / "cached" / "student.pt").state_dict()
    b = load_checkpoint(tmp_path / "online" / "student.pt").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def steps(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text()
                .splitlines() if json.loads(x)["type"] == "step"]

    sa, sb = steps("cached"), steps("online")
    assert [s["loss"] for s in sa] == [s["loss"] for s in sb]
    assert [s["mentor_rank"] for s in sa] == [s["mentor_rank"] for s in sb]


def test_train_mentor_on_an_image_folder(prepared_images, tmp_path):
    """Supervised training from the JPEG betons with the recipe's knobs, then resume ==
    uninterrupted (the keyed views are a pure function of seed, epoch and sample)."""
    from ckd.models import load_checkpoint, read_checkpoint_meta

    base = ["train-mentor", "--arch", "resnet8", "--prepared", prepared_images,
            "--resolution", "32", "--batch-size", "8", "--device", "cpu", "--no-progress",
            "--mentor-dir", tmp_path / "mentors"]
    res = _ckd(*base, "--epochs", "2", "--schedule", "cosine", "--warmup-epochs", "1",
               "--label-smoothing", "0.1", "--no-decay-norm-bias", "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    path = tmp_path / "mentors" / "imagefolder" / "resnet8.pt"
    meta = read_checkpoint_meta(path)
    assert meta["arch"] == "resnet8" and 0 <= meta["metrics"]["test_acc"] <= 100
    res = _ckd("eval", path, "--prepared", prepared_images, "--resolution", "32", "--out",
               tmp_path / "e.jsonl")
    assert res.exit_code == 0, res.output
    # the eval's center-crop top-1 is the accuracy training reported
    assert json.loads((tmp_path / "e.jsonl").read_text())["top1"] == pytest.approx(
        meta["metrics"]["test_acc"], abs=1e-3)

    const = [*base, "--schedule", "constant", "--mentor-dir", tmp_path / "m2"]
    assert _ckd(*const, "--epochs", "2", "--out", tmp_path / "whole").exit_code == 0
    assert _ckd(*const, "--epochs", "1", "--out", tmp_path / "part",
                "--mentor-dir", tmp_path / "m3").exit_code == 0
    res = _ckd(*const, "--epochs", "2", "--out", tmp_path / "part", "--resume",
               "--resume-allow", "epochs", "--mentor-dir", tmp_path / "m4")
    assert res.exit_code == 0, res.output
    a = load_checkpoint(tmp_path / "whole" / "student.pt").state_dict()
    b = load_checkpoint(tmp_path / "part" / "student.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Mentors named by builder and checkpoint: NAME=timm:MODEL:FILE, NAME=torchvision:ARCH:FILE,
NAME=module.path:Class:FILE. Each state_dict loads under weights_only into the named
architecture, its input resolution and normalisation come from the model's own config,
and wrong weights, names or resolutions are refused with one line naming the fix.

timm itself imports only with a torchvision built for the installed torch: the
`fake_timm` fixture (tests/fake_timm.py) stands in for its three functions (is_model,
list_models, create_model with a `pretrained_cfg`); `test_real_timm_mentor` runs where
timm imports."""

from __future__ import annotations

import sys
from pathlib import Path

import fake_timm as fake_timm_module
import pytest
import torch

from ckd.cache.mentors import (
    check_resolution,
    load_mentor,
    mentor_arch,
    mentor_input,
    parse_mentor_value,
    resolve_mentors,
)
from ckd.models import create_model
from ckd.models.checkpoint import CheckpointError


def _state_dict(tmp_path: Path, arch: str, num_classes: int = 3, name: str = "w.pth",
                **kw) -> Path:
    torch.manual_seed(0)
    path = tmp_path / name
    torch.save(create_model(arch, num_classes, **kw).state_dict(), path)
    return path


def test_parse_mentor_value(tmp_path):
    assert parse_mentor_value("timm:vit_small_patch16_224:w.pth") == (
        "timm:vit_small_patch16_224", Path("w.pth"))
    assert parse_mentor_value("torchvision:resnet50:/x/w.pth") == (
        "torchvision:resnet50", Path("/x/w.pth"))
    assert parse_mentor_value("pkg.mod:Net:w.pt") == ("pkg.mod:Net", Path("w.pt"))
    assert parse_mentor_value("mentors/r110.pt") == (None, Path("mentors/r110.pt"))
    odd = tmp_path / "a:b:c"  # an existing file whose name looks like a spec stays a file
    odd.write_bytes(b"")
    assert parse_mentor_value(str(odd)) == (None, odd)
    with pytest.raises(ValueError, match="timm:<model>:<checkpoint>"):
        parse_mentor_value("timm:w.pth")


def test_torchvision_state_dict_as_a_mentor(tmp_path):
    sd = _state_dict(tmp_path, "resnet18")
    paths = resolve_mentors([f"tv=torchvision:resnet18:{sd}"], "imagefolder")
    assert paths == {"tv": sd}
    assert mentor_arch("tv", sd) == "torchvision:resnet18"
    model = load_mentor("tv", sd, 3, torch.device("cpu"))
    ref = create_model("resnet18", 3)
    ref.load_state_dict(torch.load(sd, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), ref.eval()(x))
    # torchvision's convention: 224 px, ImageNet statistics
    got = mentor_input("tv", "torchvision:resnet18", None, None)
    assert got == {"resolution": 224, "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225)}
    assert mentor_input("tv", "torchvision:resnet18", None, 160)["resolution"] == 160


def test_renormalised_for_the_mentors_own_statistics(tmp_path):
    sd = _state_dict(tmp_path, "resnet18")
    resolve_mentors([f"tv=torchvision:resnet18:{sd}"], "imagefolder")
    data = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = load_mentor("tv", sd, 3, torch.device("cpu"), norm=data)
    plain = load_mentor("tv", sd, 3, torch.device("cpu"))
    u = torch.rand(2, 3, 64, 64)
    x_data = (u - 0.5) / 0.25  # what the pipelines feed: the data's normalisation
    own = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), \
        torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x_data), plain((u - own[0]) / own[1]), rtol=1e-4,
                               atol=1e-4)


def test_another_architectures_weights_are_refused_naming_both(tmp_path):
    sd = _state_dict(tmp_path, "resnet34")
    resolve_mentors([f"tv=torchvision:resnet18:{sd}"], "x")
    with pytest.raises(CheckpointError, match=r"is resnet34 but .*torchvision:resnet18"):
        load_mentor("tv", sd, 3, torch.device("cpu"))
    mb = _state_dict(tmp_path, "mobilenet_v2", name="mb.pth")
    resolve_mentors([f"m=ckd.models.imagenet:ImageNetResNet:{mb}"], "x")
    with pytest.raises((CheckpointError, ValueError), match="ImageNetResNet"):
        load_mentor("m", mb, 3, torch.device("cpu"))


def test_import_path_mentor(tmp_path):
    sd = _state_dict(tmp_path, "mobilenet_v2")
    resolve_mentors([f"mb=ckd.models.imagenet:ImageNetMobileNetV2:{sd}"], "x")
    assert mentor_arch("mb", sd) == "ckd.models.imagenet:ImageNetMobileNetV2"
    model = load_mentor("mb", sd, 3, torch.device("cpu"))
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    # the class says nothing of its input size: the flag is asked for, by name
    with pytest.raises(ValueError, match="--resolution mb=PIXELS"):
        mentor_input("mb", "ckd.models.imagenet:ImageNetMobileNetV2", model, None)
    assert mentor_input("mb", "ckd.models.imagenet:ImageNetMobileNetV2", model, 96) == {
        "resolution": 96}


# ------------------------------------------------------------------ timm
@pytest.fixture()
def fake_timm(monkeypatch):
    mod = fake_timm_module.module()
    monkeypatch.setitem(sys.modules, "timm", mod)
    return mod


def _timm_state_dict(tmp_path, timm, name):
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pth"
    torch.save(timm.create_model(name, num_classes=3).state_dict(), path)
    return path


def test_timm_mentor_from_its_config(fake_timm, tmp_path):
    sd = _timm_state_dict(tmp_path, fake_timm, "test_vit")
    resolve_mentors([f"vit=timm:test_vit:{sd}"], "x")
    assert mentor_arch("vit", sd) == "timm:test_vit"
    assert mentor_input("vit", "timm:test_vit", None, None) == {
        "resolution": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    model = load_mentor("vit", sd, 3, torch.device("cpu"))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    # a resolution the ViT cannot take: one line naming the fix
    with pytest.raises(ValueError, match=r"cannot take 48 px.*--resolution vit=PIXELS"):
        check_resolution(model, "vit", "timm:test_vit", 48, torch.device("cpu"))
    res_sd = _timm_state_dict(tmp_path, fake_timm, "test_resnet")
    resolve_mentors([f"vit=timm:test_vit:{res_sd}"], "x")  # a ResNet's weights for a ViT
    with pytest.raises(CheckpointError, match=r"does not fit timm:test_vit"):
        load_mentor("vit", res_sd, 3, torch.device("cpu"))


def test_unknown_timm_name(fake_timm, tmp_path):
    sd = _timm_state_dict(tmp_path, fake_timm, "test_vit")
    resolve_mentors([f"v=timm:test_vitt:{sd}"], "x")
    with pytest.raises(ValueError, match=r"no model named 'test_vitt' \(close: test_vit"):
        load_mentor("v", sd, 3, torch.device("cpu"))


def test_timm_missing_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # import fails
    sd = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, sd)
    resolve_mentors([f"v=timm:test_vit:{sd}"], "x")
    with pytest.raises(ValueError, match="need the timm package.*pip install timm"):
        load_mentor("v", sd, 3, torch.device("cpu"))


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_real_timm_mentor(name, tmp_path):
    timm = pytest.importorskip("timm", exc_type=ImportError)
    sd = tmp_path / f"{name}.pth"
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=3).eval()
    torch.save(ref.state_dict(), sd)
    resolve_mentors([f"m=timm:{name}:{sd}"], "x")
    model = load_mentor("m", sd, 3, torch.device("cpu"))
    got = mentor_input("m", f"timm:{name}", None, None)
    assert got["resolution"] == ref.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, got["resolution"], got["resolution"])
    assert torch.equal(model(x), ref(x))

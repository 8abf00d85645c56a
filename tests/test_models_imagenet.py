"""The ImageNet zoo: torchvision's state_dict names and shapes, published parameter counts,
and torchvision-layout checkpoints loading under weights_only=True (no weights fetched)."""

import pytest
import torch
from click.testing import CliRunner

from ckd.models import create_model, infer_arch, load_checkpoint, param_count, resolve_arch
from ckd.models.registry import ARCHS, state_shapes

# torchvision's documented parameter counts at 1000 classes (its weights' `num_params`).
PUBLISHED = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
             "mobilenet_v2": 3_504_872}
# len(torchvision.models.X().state_dict())
NUM_KEYS = {"resnet18": 122, "resnet34": 218, "resnet50": 320, "mobilenet_v2": 314}


def _bn(keys: dict, name: str, c: int) -> None:
    for p in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{p}"] = (c,)
    keys[f"{name}.num_batches_tracked"] = ()


def torchvision_resnet_keys(bottleneck: bool, layers: tuple, nc: int) -> dict:
    """torchvision/models/resnet.py's state_dict, written out from its architecture."""
    keys = {"conv1.weight": (64, 3, 7, 7)}
    _bn(keys, "bn1", 64)
    cin = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), 1):
        for b in range(n):
            p = f"layer{li}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, cin, 1, 1) if bottleneck else (planes, cin, 3, 3)
            _bn(keys, f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(keys, f"{p}.bn2", planes)
            out = planes * 4 if bottleneck else planes
            if bottleneck:
                keys[f"{p}.conv3.weight"] = (out, planes, 1, 1)
                _bn(keys, f"{p}.bn3", out)
            if b == 0 and (li > 1 or cin != out):
                keys[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
                _bn(keys, f"{p}.downsample.1", out)
            cin = out
    keys["fc.weight"], keys["fc.bias"] = (nc, cin), (nc,)
    return keys


def torchvision_mobilenet_v2_keys(nc: int) -> dict:
    """torchvision/models/mobilenetv2.py's state_dict (width 1.0), from its architecture."""
    keys = {"features.0.0.weight": (32, 3, 3, 3)}
    _bn(keys, "features.0.1", 32)
    cin, f = 32, 1
    for t, c, n in ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
                    (6, 320, 1)):
        for _ in range(n):
            p, hid = f"features.{f}.conv", cin * t
            j = 0
            if t != 1:
                keys[f"{p}.0.0.weight"] = (hid, cin, 1, 1)
                _bn(keys, f"{p}.0.1", hid)
                j = 1
            keys[f"{p}.{j}.0.weight"] = (hid, 1, 3, 3)
            _bn(keys, f"{p}.{j}.1", hid)
            keys[f"{p}.{j + 1}.weight"] = (c, hid, 1, 1)
            _bn(keys, f"{p}.{j + 2}", c)
            cin, f = c, f + 1
    keys["features.18.0.weight"] = (1280, 320, 1, 1)
    _bn(keys, "features.18.1", 1280)
    keys["classifier.1.weight"], keys["classifier.1.bias"] = (nc, 1280), (nc,)
    return keys


EXPECTED = {
    "resnet18": lambda nc: torchvision_resnet_keys(False, (2, 2, 2, 2), nc),
    "resnet34": lambda nc: torchvision_resnet_keys(False, (3, 4, 6, 3), nc),
    "resnet50": lambda nc: torchvision_resnet_keys(True, (3, 4, 6, 3), nc),
    "mobilenet_v2": torchvision_mobilenet_v2_keys,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_keys_shapes_and_counts_are_torchvision(name):
    for nc in (1000, 10):
        shapes = state_shapes(name, nc)
        assert shapes == EXPECTED[name](nc)  # same names, same order-free shapes
    assert list(state_shapes(name, 1000)) == list(EXPECTED[name](1000))  # same order too
    assert len(state_shapes(name, 1000)) == NUM_KEYS[name]
    assert param_count(name, 1000) == PUBLISHED[name]
    assert ARCHS[name].input_size == 224


def test_spot_keys_from_torchvision():
    assert state_shapes("resnet50", 1000)["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert state_shapes("resnet50", 1000)["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in state_shapes("resnet18", 1000)
    mb = state_shapes("mobilenet_v2", 1000)
    assert mb["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert mb["features.17.conv.2.weight"] == (320, 960, 1, 1)


def test_aliases():
    assert resolve_arch("r50") == "resnet50" and resolve_arch("R18") == "resnet18"
    assert resolve_arch("mbv2-224") == "mobilenet_v2"
    assert resolve_arch("mbv2") == "MobileNetV2"  # the CIFAR half-width one keeps its alias


def test_torchvision_checkpoint_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    src = create_model("resnet18", 1000).eval()
    path = tmp_path / "resnet18-f37072fd.pth"  # torchvision's files: a bare state_dict
    torch.save(src.state_dict(), path)
    assert infer_arch(torch.load(path, weights_only=True)) == "resnet18"
    model = load_checkpoint(path, arch="resnet18", num_classes=1000)
    model = model[0] if isinstance(model, tuple) else model
    x = torch.randn(1, 3, 64, 64)  # any size: global pooling (224 px is the design size)
    with torch.no_grad():
        y = model.eval()(x)
        assert y.shape == (1, 1000) and torch.equal(y, src(x))
    mb = create_model("mobilenet_v2", 10).eval()
    with torch.no_grad():
        assert mb(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_cli_lists_imagenet_models():
    from ckd.cli.main import main

    out = CliRunner().invoke(main, ["models", "--num-classes", "1000"])
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith("resnet50"))
    assert "r50" in line and "25.557M" in line and "224 px" in line


FEATURES_224 = {
    "resnet18": [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7),
                 (512,)],
    "resnet50": [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14),
                 (2048, 7, 7), (2048,)],
    "mobilenet_v2": [(32, 112, 112), (24, 56, 56), (32, 28, 28), (96, 14, 14), (320, 7, 7),
                     (1280,)],
}


def test_features_for_feature_methods():
    from ckd.models import feature_shapes

    for name, shapes in FEATURES_224.items():
        assert list(feature_shapes(name, 224, 1000)) == shapes
    torch.manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        model = create_model(name, 10).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            plain = model(x)
            feats, logits = model(x, is_feat=True)
            pre, logits_pre = model(x, is_feat=True, preact=True)
        assert torch.equal(plain, logits) and torch.equal(plain, logits_pre)
        head = dict(model.named_modules())[ARCHS[name].classifier]
        assert torch.equal(head(feats[-1]), logits)
        if name == "resnet18":
            assert (pre[2] < 0).any() and torch.equal(torch.relu(pre[2]), feats[2])

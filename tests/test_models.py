"""CIFAR model zoo: RepDistiller parity (names, keys, parameter counts), aliases, forward
shapes, and the three checkpoint formats with their error messages."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ckd.models import (
    ARCHS,
    CheckpointError,
    count_params,
    create_model,
    file_sha256,
    infer_arch,
    list_models,
    load_checkpoint,
    param_count,
    read_checkpoint_meta,
    resolve_arch,
    save_checkpoint,
)
from ckd.models.registry import state_shapes

# Published RepDistiller/CRD parameter counts at 100 classes, in millions.
PUBLISHED_M = {
    "r8": 0.084, "r14": 0.18, "r20": 0.28, "r32": 0.47, "r56": 0.86, "r110": 1.74,
    "r8x4": 1.23, "r32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26,
    "vgg8": 3.97, "vgg13": 9.46, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36,
}

# state_dict sizes of RepDistiller's own modules (measured against a transcription of
# HobbitLong/RepDistiller models/*.py: same keys, same order, same shapes).
REPDISTILLER_NUM_KEYS = {
    "resnet8": 56, "resnet14": 92, "resnet20": 128, "resnet32": 200, "resnet44": 272,
    "resnet56": 344, "resnet110": 668, "resnet8x4": 62, "resnet32x4": 206, "wrn_16_1": 82,
    "wrn_16_2": 83, "wrn_40_1": 226, "wrn_40_2": 227, "vgg8": 37, "vgg11": 58, "vgg13": 72,
    "vgg16": 93, "vgg19": 114, "MobileNetV2": 320, "ShuffleV1": 296, "ShuffleV2": 338,
}

# A few keys per family exactly as RepDistiller names them.
REPDISTILLER_KEYS = {
    "resnet8": ["conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer3.0.downsample.1.running_var", "fc.weight", "fc.bias"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight",
                 "bn1.running_mean", "fc.weight"],
    "vgg13": ["block0.0.weight", "block0.0.bias", "block0.1.running_var", "block0.3.weight",
              "block4.4.num_batches_tracked", "classifier.weight"],
    "MobileNetV2": ["conv1.0.weight", "conv1.1.bias", "blocks.6.0.conv.7.running_mean",
                    "conv2.1.weight", "classifier.0.weight"],
    "ShuffleV1": ["layer1.0.conv3.weight", "layer3.3.bn3.bias", "linear.weight"],
    "ShuffleV2": ["layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight",
                  "bn2.running_var", "linear.bias"],
}


CIFAR_ARCHS = [n for n, spec in ARCHS.items() if spec.input_size == 32]


class NotAllowed:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self) -> None:
        self.x = 1


# ---------------------------------------------------------------- architectures

@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_counts_match_published(name: str) -> None:
    measured = param_count(name, 100) / 1e6
    assert abs(measured - PUBLISHED_M[name]) < 0.01, f"{name}: {measured:.4f}M"


def test_exact_param_counts_and_meta_equals_real() -> None:
    # Exact RepDistiller counts; the meta-device count used by `ckd models` equals a real one.
    assert param_count("r8") == 83892
    assert param_count("sn-v2") == 1355528
    assert param_count("r32x4") == 7433860
    assert count_params(create_model("mbv2", 100)) == param_count("mbv2", 100) == 812836
    assert param_count("r8", 10) == 83892 - 90 * 65  # fc: 64 inputs + bias per class


@pytest.mark.parametrize("name", CIFAR_ARCHS)  # the 224 px zoo: test_models_imagenet.py
def test_forward_shapes(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for nc in (10, 100):
        model = create_model(name, num_classes=nc).eval()
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, nc) and y.dtype == torch.float32
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(REPDISTILLER_NUM_KEYS))  # the CNNs (not mamba/vit)
def test_state_dict_keys_follow_repdistiller(name: str) -> None:
    keys = list(state_shapes(name, 100))
    assert len(keys) == REPDISTILLER_NUM_KEYS[name]
    for k in REPDISTILLER_KEYS.get(name, []):
        assert k in keys, f"{name} lacks RepDistiller key {k}"


def test_every_arch_is_identified_from_its_weights() -> None:
    for name in ARCHS:
        for nc in (10, 100):
            shapes = state_shapes(name, nc)
            fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
            assert infer_arch(fake) == name


# ---------------------------------------------------------------- names

ALIASES = {
    "r8": "resnet8", "r14": "resnet14", "r20": "resnet20", "r32": "resnet32",
    "r44": "resnet44", "r56": "resnet56", "r110": "resnet110", "r8x4": "resnet8x4",
    "r32x4": "resnet32x4", "wrn-16-1": "wrn_16_1", "wrn-16-2": "wrn_16_2",
    "wrn-40-1": "wrn_40_1", "wrn-40-2": "wrn_40_2", "vgg8": "vgg8", "vgg11": "vgg11",
    "vgg13": "vgg13", "vgg16": "vgg16", "vgg19": "vgg19", "vgg8_bn": "vgg8",
    "vgg13_bn": "vgg13", "mbv2": "MobileNetV2", "mobile_half": "MobileNetV2",
    "sn-v1": "ShuffleV1", "sn-v2": "ShuffleV2",
    # canonical names, and case/separator variants
    "resnet110": "resnet110", "wrn_40_2": "wrn_40_2", "MobileNetV2": "MobileNetV2",
    "ShuffleV1": "ShuffleV1", "mobilenetv2": "MobileNetV2", "WRN_40_2": "wrn_40_2",
    "sn_v2": "ShuffleV2", " R8 ": "resnet8",
}


@pytest.mark.parametrize(("alias", "canonical"), sorted(ALIASES.items()))
def test_aliases_resolve(alias: str, canonical: str) -> None:
    assert resolve_arch(alias) == canonical


def test_unknown_name_lists_valid_names() -> None:
    for bad in ("resnet9", "wrn-40-3", "", "ResNet51"):
        with pytest.raises(ValueError) as err:
            create_model(bad)
        msg = str(err.value)
        assert repr(bad) in msg
        for must in ("resnet8", "r8", "wrn_40_2", "wrn-40-2", "vgg13", "MobileNetV2", "mbv2",
                     "ShuffleV1", "sn-v1", "sn-v2"):
            assert must in msg


def test_bad_num_classes() -> None:
    for bad in (0, -3, 2.5, "10"):
        with pytest.raises(ValueError, match="num_classes"):
            create_model("r8", bad)


def test_list_models_rows() -> None:
    rows = list_models()
    assert [r["name"] for r in rows] == list(ARCHS)
    by = {r["name"]: r for r in rows}
    assert by["resnet8"]["aliases"] == ("r8",) and by["resnet8"]["params"] == 83892
    assert "mbv2" in by["MobileNetV2"]["aliases"]
    assert list_models(10)[0]["params"] < by["resnet8"]["params"]


def test_cli_lists_models() -> None:
    from ckd.cli.main import main

    out = CliRunner().invoke(main, ["models"])
    assert out.exit_code == 0, out.output
    assert "resnet8x4" in out.output and "r8x4" in out.output and "1.234M" in out.output
    assert len([ln for ln in out.output.splitlines() if ln.strip()]) == len(ARCHS) + 1
    out10 = CliRunner().invoke(main, ["models", "--num-classes", "10"])
    assert out10.exit_code == 0 and "0.078M" in out10.output and "0.084M" not in out10.output


# ---------------------------------------------------------------- checkpoints

def _trained_like(name: str = "r8", nc: int = 10) -> torch.nn.Module:
    """A model with non-trivial BN statistics, so a lost buffer changes the outputs."""
    torch.manual_seed(1)
    model = create_model(name, nc).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model.eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b(x))


def test_ckd_format_round_trip(tmp_path) -> None:
    model = _trained_like()
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, arch="r8", num_classes=10,
                           dataset={"name": "cifar10", "fingerprint": "abc"},
                           metrics={"test_acc": torch.tensor(0.5), "epoch": 3})
    assert os.listdir(tmp_path / "sub") == ["m.pt"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert not loaded.training and _same_outputs(model, loaded)
    assert _same_outputs(model, load_checkpoint(path, arch="resnet8", num_classes=10))
    meta = read_checkpoint_meta(path)
    assert meta["format"] == "ckd" and meta["arch"] == "resnet8" and meta["num_classes"] == 10
    assert meta["dataset"] == {"name": "cifar10", "fingerprint": "abc"}
    assert meta["metrics"] == {"test_acc": 0.5, "epoch": 3}
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"arch", "num_classes", "state_dict", "dataset", "metrics"}


def test_repdistiller_format_round_trip(tmp_path) -> None:
    model = _trained_like("r8", 100)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # optimizer state with momentum buffers, as in RepDistiller's files
    model.eval()
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(71.25),
             "best_acc": torch.tensor(71.5), "optimizer": opt.state_dict()}
    torch.save(state, tmp_path / "resnet8_best.pth")
    loaded = load_checkpoint(tmp_path / "resnet8_best.pth", arch="r8")
    assert not loaded.training and _same_outputs(model, loaded)
    meta = read_checkpoint_meta(tmp_path / "resnet8_best.pth")
    assert (meta["format"], meta["arch"], meta["num_classes"]) == ("repdistiller", "resnet8", 100)
    assert meta["metrics"] == {"epoch": 240, "accuracy": 71.25, "best_acc": 71.5}
    # nn.DataParallel checkpoints carry a "module." prefix
    state["model"] = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "dp.pth")
    assert _same_outputs(model, load_checkpoint(tmp_path / "dp.pth", arch="resnet8"))


def test_save_unwraps_dataparallel_and_compile_prefixes(tmp_path) -> None:
    model = _trained_like("r8", 10)

    class Wrapper(torch.nn.Module):  # stands in for DDP (module.) and torch.compile
        def __init__(self, inner: torch.nn.Module, attr: str) -> None:
            super().__init__()
            setattr(self, attr, inner)

    wrapped = Wrapper(Wrapper(model, "_orig_mod"), "module")
    assert next(iter(wrapped.state_dict())).startswith("module._orig_mod.")
    save_checkpoint(tmp_path / "w.pt", wrapped, arch="r8", num_classes=10, dataset=None,
                    metrics=None)
    assert _same_outputs(model, load_checkpoint(tmp_path / "w.pt"))
    # channels_last weights are stored contiguous
    model_cl = model.to(memory_format=torch.channels_last)
    save_checkpoint(tmp_path / "cl.pt", model_cl, arch="r8", num_classes=10, dataset=None,
                    metrics=None)
    raw = torch.load(tmp_path / "cl.pt", weights_only=True)["state_dict"]
    assert all(v.is_contiguous() for v in raw.values())


def test_plain_state_dict_round_trip(tmp_path) -> None:
    model = _trained_like("sn-v2", 10)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt", arch="ShuffleV2")  # classes inferred
    assert loaded.linear.out_features == 10 and _same_outputs(model, loaded)
    meta = read_checkpoint_meta(tmp_path / "sd.pt")
    assert (meta["format"], meta["arch"], meta["num_classes"]) == ("state_dict", "ShuffleV2", 10)
    # very old files lack BN's num_batches_tracked: still loadable
    old = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(old, tmp_path / "old.pt")
    assert _same_outputs(model, load_checkpoint(tmp_path / "old.pt", arch="sn-v2"))


def test_arch_and_class_mismatch_errors(tmp_path) -> None:
    model = _trained_like("r8", 10)
    save_checkpoint(tmp_path / "c.pt", model, arch="r8", num_classes=10, dataset="cifar10",
                    metrics={})
    torch.save({"epoch": 1, "model": model.state_dict()}, tmp_path / "rd.pth")
    with pytest.raises(CheckpointError, match=r"is resnet8 but --arch r110 \(resnet110\)"):
        load_checkpoint(tmp_path / "c.pt", arch="r110")
    with pytest.raises(CheckpointError, match=r"is resnet8 but --arch wrn-16-2"):
        load_checkpoint(tmp_path / "rd.pth", arch="wrn-16-2")
    for f in ("c.pt", "rd.pth"):
        with pytest.raises(CheckpointError, match="classifier has 10 classes, expected 100"):
            load_checkpoint(tmp_path / f, arch="r8", num_classes=100)
    with pytest.raises(CheckpointError, match="pass arch .*resnet8"):
        load_checkpoint(tmp_path / "rd.pth")  # foreign formats do not record the arch
    with pytest.raises(ValueError, match="unknown architecture 'r9'"):
        load_checkpoint(tmp_path / "rd.pth", arch="r9")


def test_shape_mismatch_names_key_expected_and_found(tmp_path) -> None:
    sd = create_model("r8", 10).state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pt", arch="r8")
    msg = str(err.value)
    assert "layer1.0.conv1.weight" in msg and "(16, 16, 3, 3)" in msg and "(16, 16, 5, 5)" in msg
    del sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing keys.*layer1.0.conv1.weight"):
        load_checkpoint(tmp_path / "missing.pt", arch="r8")


def test_recorded_arch_is_trusted_without_a_zoo_sweep(tmp_path, monkeypatch) -> None:
    """A ckd checkpoint records its arch: loading checks the weights against that arch's
    shapes only; the zoo sweep runs for files that record nothing, once per process."""
    import ckd.models.checkpoint as ckpt

    model = _trained_like("r8", 10)
    save_checkpoint(tmp_path / "c.pt", model, arch="r8", num_classes=10, dataset="cifar10",
                    metrics={})

    def no_sweep(sd):
        raise AssertionError("zoo sweep on a checkpoint that records its arch")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "infer_arch", no_sweep)
        assert _same_outputs(model, load_checkpoint(tmp_path / "c.pt"))
        assert _same_outputs(model, load_checkpoint(tmp_path / "c.pt", arch="r8",
                                                    num_classes=10))
    # a file that records nothing: swept once, then answered from the per-process cache
    torch.save({"model": model.state_dict()}, tmp_path / "rd.pth")
    ckpt._SWEEPS.clear()
    calls = []
    real = ckpt.state_shapes
    monkeypatch.setattr(ckpt, "state_shapes", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert read_checkpoint_meta(tmp_path / "rd.pth")["arch"] == "resnet8"
    swept = len(calls)
    assert swept >= len(ARCHS) - 1
    assert read_checkpoint_meta(tmp_path / "rd.pth")["arch"] == "resnet8"
    assert len(calls) == swept


def test_recorded_arch_that_does_not_fit_names_both(tmp_path) -> None:
    sd = create_model("r8", 10).state_dict()
    torch.save({"format": "ckd", "arch": "resnet14", "num_classes": 10, "state_dict": sd},
               tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="records arch resnet14 but its weights are "
                                              "resnet8"):
        load_checkpoint(tmp_path / "mislabelled.pt")
    del sd["layer1.0.conv1.weight"]  # fits no zoo arch: the mismatch itself is named
    torch.save({"format": "ckd", "arch": "resnet8", "num_classes": 10, "state_dict": sd},
               tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"does not fit resnet8 \(records resnet8\): "
                                              "missing keys.*layer1.0.conv1.weight"):
        load_checkpoint(tmp_path / "broken.pt")


def test_save_refuses_mislabelled_model(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="is resnet8 but --arch r14"):
        save_checkpoint(tmp_path / "x.pt", create_model("r8", 10), arch="r14", num_classes=10,
                        dataset=None, metrics=None)
    with pytest.raises(CheckpointError, match=r"fc.weight: expected \(100, 64\), found \(10, 64"):
        save_checkpoint(tmp_path / "x.pt", create_model("r8", 10), arch="r8", num_classes=100,
                        dataset=None, metrics=None)
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, create_model("r8", 10), arch="r8", num_classes=10, dataset="a",
                    metrics={"v": 1})
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, create_model("r8", 10), arch="r8", num_classes=10, dataset="b",
                        metrics={})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]


def test_weights_only_refusal_explains_conversion(tmp_path) -> None:
    torch.save({"model": create_model("r8", 10).state_dict(), "cfg": NotAllowed()},
               tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "pickled.pth", arch="r8")
    msg = str(err.value)
    assert "NotAllowed" in msg and "weights_only=False" in msg
    assert "model.state_dict()" in msg and "trust" in msg
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint_meta(tmp_path / "pickled.pth")


def test_unreadable_and_missing_files(tmp_path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", arch="r8")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint layout.*weights"):
        load_checkpoint(tmp_path / "odd.pt", arch="r8")
    missing = tmp_path / "nope" / "resnet110.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(missing, arch="r110")
    msg = str(err.value)
    assert str(missing) in msg and "ckd train-mentor --arch ARCH --dataset DATASET" in msg
    assert "RepDistiller" in msg


def test_file_sha256(tmp_path) -> None:
    p = tmp_path / "f.bin"
    data = os.urandom(3 << 20)  # several read chunks
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- features (is_feat)

def _resnet_shapes(w: tuple[int, int, int, int]) -> list[tuple[int, ...]]:
    return [(w[0], 32, 32), (w[1], 32, 32), (w[2], 16, 16), (w[3], 8, 8), (w[3],)]


def _wrn_shapes(k: int) -> list[tuple[int, ...]]:
    return [(16, 32, 32), (16 * k, 32, 32), (32 * k, 16, 16), (64 * k, 8, 8), (64 * k,)]


_VGG_SHAPES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)]

# RepDistiller's `feats` for a 32x32 input: stage features, then the pooled feature.
FEATURE_SHAPES = {
    **{f"resnet{d}": _resnet_shapes((16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet_shapes((32, 64, 128, 256)),
    "resnet32x4": _resnet_shapes((32, 64, 128, 256)),
    "wrn_16_1": _wrn_shapes(1), "wrn_16_2": _wrn_shapes(2), "wrn_40_1": _wrn_shapes(1),
    "wrn_40_2": _wrn_shapes(2),
    **{f"vgg{d}": _VGG_SHAPES for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)],
    "ShuffleV1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)],
    "ShuffleV2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)],
    # students beyond CNNs: the 8x8 token map after the embedding and after each block
    "mamba_tiny": [(64, 8, 8)] * 5 + [(64,)], "mamba_small": [(128, 8, 8)] * 7 + [(128,)],
    "vit_tiny": [(96, 8, 8)] * 5 + [(96,)], "vit_small": [(192, 8, 8)] * 7 + [(192,)],
}


def test_feature_shapes_of_every_arch() -> None:
    from ckd.models import feature_shapes

    for name in CIFAR_ARCHS:  # meta device: shapes only (224 px zoo: test_models_imagenet)
        assert list(feature_shapes(name)) == FEATURE_SHAPES[name], name


# one arch per family (the others share its forward code)
@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_1", "vgg8", "MobileNetV2",
                                  "ShuffleV1", "ShuffleV2", "mamba_tiny", "vit_tiny"])
def test_is_feat_returns_repdistiller_features(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10)
    x = torch.randn(2, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            plain = model(x)
            feats, logits = model(x, is_feat=True)
            pre, logits_pre = model(x, is_feat=True, preact=True)
        # the logits do not depend on how forward is asked (bitwise)
        assert torch.equal(plain, logits) and torch.equal(plain, logits_pre)
        assert [tuple(f.shape[1:]) for f in feats] == FEATURE_SHAPES[name]
        assert [f.shape for f in pre] == [f.shape for f in feats]
        # the last feature is exactly what the classifier reads
        head = dict(model.named_modules())[ARCHS[name].classifier]
        assert torch.equal(head(feats[-1]), logits)


@pytest.mark.parametrize("name", ["resnet8", "vgg8", "ShuffleV1", "ShuffleV2"])
def test_preact_features_are_the_tensors_before_the_stage_relu(name: str) -> None:
    model = create_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, _ = model(x, is_feat=True)
        pre, _ = model(x, is_feat=True, preact=True)
    assert (pre[1] < 0).any()  # really before a ReLU
    for f, p in zip(feats[1:-1], pre[1:-1], strict=True):
        if name == "ShuffleV2":  # RepDistiller's preact there is the unshuffled concat
            from ckd.models.shufflenet import channel_shuffle

            assert torch.equal(channel_shuffle(F.relu(p), 2), f)
        else:
            assert torch.equal(F.relu(p), f)


def test_repdistiller_checkpoint_gives_features(tmp_path) -> None:
    model = _trained_like("wrn_16_2", 100)
    torch.save({"epoch": 240, "model": model.state_dict()}, tmp_path / "wrn.pth")
    loaded = load_checkpoint(tmp_path / "wrn.pth", arch="wrn_16_2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fa, la = model(x, is_feat=True)
        fb, lb = loaded(x, is_feat=True)
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(fa, fb, strict=True))

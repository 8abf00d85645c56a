"""Name -> constructor table for the model zoo, with short aliases.

CIFAR (32 px): canonical names are RepDistiller's `model_dict` keys (except `MobileNetV2`
for its `mobile_half`), so RepDistiller checkpoint folders map directly onto them.
ImageNet (224 px): resnet18/34/50 and mobilenet_v2 with torchvision's names and keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .imagenet import mobilenet_v2, resnet18, resnet34, resnet50
from .mobilenetv2 import mobilenetv2_half
from .resnet import resnet
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import vgg
from .wrn import wrn


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[[int], nn.Module]  # num_classes -> model
    aliases: tuple[str, ...]
    classifier: str  # state_dict prefix of the final Linear ("fc", "classifier.0", ...)
    input_size: int = 32  # the resolution the architecture is designed for (pixels)


def _resnet(depth: int, wide: bool = False) -> Callable[[int], nn.Module]:
    return lambda nc: resnet(depth, wide, num_classes=nc)


def _wrn(depth: int, widen: int) -> Callable[[int], nn.Module]:
    return lambda nc: wrn(depth, widen, num_classes=nc)


def _vgg(depth: int) -> Callable[[int], nn.Module]:
    return lambda nc: vgg(depth, num_classes=nc)


_SPECS: list[ArchSpec] = [
    *[ArchSpec(f"resnet{d}", _resnet(d), (f"r{d}",), "fc") for d in (8, 14, 20, 32, 44, 56, 110)],
    ArchSpec("resnet8x4", _resnet(8, True), ("r8x4",), "fc"),
    ArchSpec("resnet32x4", _resnet(32, True), ("r32x4",), "fc"),
    *[ArchSpec(f"wrn_{d}_{w}", _wrn(d, w), (f"wrn-{d}-{w}",), "fc")
      for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))],
    *[ArchSpec(f"vgg{d}", _vgg(d), (f"vgg{d}_bn",), "classifier") for d in (8, 11, 13, 16, 19)],
    ArchSpec("MobileNetV2", mobilenetv2_half, ("mbv2", "mobile_half"), "classifier.0"),
    ArchSpec("ShuffleV1", lambda nc: ShuffleNetV1(num_classes=nc), ("sn-v1",), "linear"),
    ArchSpec("ShuffleV2", lambda nc: ShuffleNetV2(num_classes=nc), ("sn-v2",), "linear"),
    # ImageNet, torchvision layout (checkpoints load as plain state_dicts)
    ArchSpec("resnet18", resnet18, ("r18",), "fc", 224),
    ArchSpec("resnet34", resnet34, ("r34",), "fc", 224),
    ArchSpec("resnet50", resnet50, ("r50",), "fc", 224),
    ArchSpec("mobilenet_v2", mobilenet_v2, ("mbv2-224", "mobilenetv2_224"), "classifier.1", 224),
]
ARCHS: dict[str, ArchSpec] = {s.name: s for s in _SPECS}


def _key(name: str) -> str:
    # case- and separator-insensitive: "wrn-40-2" == "WRN_40_2", "sn-v1" == "SN_V1"
    return name.strip().lower().replace("-", "_")


_LOOKUP: dict[str, str] = {}
for _s in _SPECS:
    for _n in (_s.name, *_s.aliases):
        _LOOKUP[_key(_n)] = _s.name


def valid_names() -> str:
    return ", ".join(f"{s.name} ({'/'.join(s.aliases)})" for s in _SPECS)


def resolve_arch(name: str) -> str:
    """Canonical (RepDistiller) name for an arch name or alias; ValueError if unknown."""
    if not isinstance(name, str) or _key(name) not in _LOOKUP:
        raise ValueError(f"unknown architecture {name!r}; valid names (aliases): {valid_names()}")
    return _LOOKUP[_key(name)]


def arch_spec(name: str) -> ArchSpec:
    return ARCHS[resolve_arch(name)]


def create_model(name_or_alias: str, num_classes: int = 100) -> nn.Module:
    """Build a freshly initialised model; forward(x [B, 3, S, S]) -> logits [B, num_classes]
    (S = the spec's input_size: 32 for the CIFAR zoo, 224 for the ImageNet one)."""
    spec = arch_spec(name_or_alias)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return spec.build(num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=128)
def _meta_model(name: str, num_classes: int) -> nn.Module:
    # On the meta device nothing is allocated or initialised: shapes only, ~ms per model.
    with torch.device("meta"):
        return ARCHS[name].build(num_classes)


def param_count(name_or_alias: str, num_classes: int = 100) -> int:
    return count_params(_meta_model(resolve_arch(name_or_alias), num_classes))


def state_shapes(name_or_alias: str, num_classes: int = 100) -> dict[str, tuple[int, ...]]:
    """state_dict key -> shape of the arch, without building real weights."""
    sd = _meta_model(resolve_arch(name_or_alias), num_classes).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


@lru_cache(maxsize=256)
def feature_shapes(name_or_alias: str, image_size: int = 32,
                   num_classes: int = 100) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes of `forward(x, is_feat=True)[0]` for a square RGB input: the stage
    features, ending with the pooled feature (the classifier's input), on the meta device."""
    model = _meta_model(resolve_arch(name_or_alias), num_classes)
    x = torch.empty(2, 3, image_size, image_size, device="meta")
    with torch.no_grad():
        feats, _ = model.eval()(x, is_feat=True)
    return tuple(tuple(f.shape[1:]) for f in feats)


def list_models(num_classes: int = 100) -> list[dict]:
    """One row per arch: {'name', 'aliases' (tuple), 'params' (int, at num_classes),
    'input_size' (pixels)}."""
    return [{"name": s.name, "aliases": s.aliases, "params": param_count(s.name, num_classes),
             "input_size": s.input_size} for s in _SPECS]

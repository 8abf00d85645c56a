"""Name -> constructor table for the model zoo, with short aliases.

CIFAR (32 px): canonical names are RepDistiller's `model_dict` keys (except `MobileNetV2`
for its `mobile_half`), so RepDistiller checkpoint folders map directly onto them.
ImageNet (224 px): resnet18/34/50 and mobilenet_v2 with torchvision's names and keys.
Students beyond CNNs (a vision Mamba, a ViT; 32 px) take keyword arguments, and any
`module.path:ClassName` import path names an outside nn.Module (`create_model`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .external import build_external, is_external
from .imagenet import mobilenet_v2, resnet18, resnet34, resnet50
from .mamba import mamba_small, mamba_tiny
from .mobilenetv2 import mobilenetv2_half
from .resnet import resnet
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import vgg
from .vit import vit_small, vit_tiny
from .wrn import wrn


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[..., nn.Module]  # (num_classes, **kwargs) -> model
    aliases: tuple[str, ...]
    classifier: str  # state_dict prefix of the final Linear ("fc", "classifier.0", ...)
    input_size: int = 32  # the resolution the architecture is designed for (pixels)
    takes_kwargs: bool = False  # the CNNs are fixed; mamba/vit take dim, depth, ...
    optimizer: str = "sgd"  # default training optimizer (ViT/Mamba: AdamW; SGD stalls them)


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
    *[ArchSpec(name, build, (alias,), "head", takes_kwargs=True, optimizer="adamw")
      for name, build, alias in (("mamba_tiny", mamba_tiny, "vim-t"),
                                 ("mamba_small", mamba_small, "vim-s"),
                                 ("vit_tiny", vit_tiny, "vit-t"),
                                 ("vit_small", vit_small, "vit-s"))],
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


def is_import_path(name: str) -> bool:
    """"pkg.mod:ClassName" names an outside nn.Module rather than a zoo architecture."""
    return isinstance(name, str) and ":" in name and not is_external(name)


def is_named_arch(name: str) -> bool:
    """Not a zoo name: an import path, "timm:NAME" or "torchvision:ARCH" (recorded as given;
    ckd knows no classifier name or input size of its own for them)."""
    return is_import_path(name) or is_external(name)


def import_model_class(path: str) -> type[nn.Module]:
    """The nn.Module subclass (or factory returning one) named by "module.path:Name"."""
    mod_name, _, attr = path.strip().partition(":")
    if not mod_name or not attr:
        raise ValueError(f"student {path!r}: an import path is module.path:ClassName")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(f"student {path!r}: cannot import module {mod_name!r} ({err}); put "
                         "it on PYTHONPATH or use a zoo name (`ckd models`)") from err
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"student {path!r}: module {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ValueError(f"student {path!r} resolves to {type(obj).__name__} {obj!r}, not an "
                         "nn.Module subclass: name a class that subclasses torch.nn.Module")
    return obj


def canonical_arch(name: str) -> str:
    """A zoo name's canonical form, or an import path / timm / torchvision name as given."""
    return name.strip() if is_named_arch(name) else resolve_arch(name)


def default_optimizer(name: str) -> str:
    """The optimizer a student trains with unless told otherwise (import paths: sgd)."""
    return "sgd" if is_named_arch(name) else arch_spec(name).optimizer


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def create_model(name_or_alias: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model; forward(x [B,3,H,W]) -> logits [B, num_classes].

    `name_or_alias` is a zoo name or "module.path:ClassName"; `kwargs` go to the
    constructor (zoo students beyond CNNs, or the outside class; num_classes is passed to an
    outside class when its constructor takes it)."""
    _check_num_classes(num_classes)
    if is_external(name_or_alias):
        return build_external(name_or_alias, num_classes, **kwargs)
    if is_import_path(name_or_alias):
        cls = import_model_class(name_or_alias)
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_classes" in params and "num_classes" not in kwargs:
            kwargs = {**kwargs, "num_classes": num_classes}
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"student {name_or_alias!r}: constructor refused the keyword "
                             f"arguments {sorted(kwargs)} ({err}); set them with "
                             "--student-kwargs KEY=VALUE") from err
    spec = arch_spec(name_or_alias)
    if kwargs and not spec.takes_kwargs:
        raise ValueError(f"architecture {spec.name} takes no keyword arguments (got "
                         f"{sorted(kwargs)}): drop --student-kwargs")
    try:
        return spec.build(num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"architecture {spec.name}: bad keyword arguments {sorted(kwargs)} "
                         f"({err})") from err
    except (ValueError, RuntimeError, ZeroDivisionError) as err:  # a value the layers refuse
        raise ValueError(f"architecture {spec.name} cannot be built with --student-kwargs "
                         f"{', '.join(f'{k}={v!r}' for k, v in kwargs.items())} ({err}): "
                         "choose other values (positive sizes)") from err


def check_logits_shape(model: nn.Module, name: str, image_shape: tuple[int, int, int],
                       num_classes: int) -> None:
    """Run two blank images of the dataset's shape [2, C, H, W] through `model` and refuse
    anything but logits [2, num_classes] (before any training step)."""
    probe = torch.zeros(2, *image_shape, device=next(model.parameters(), torch.zeros(0)).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as err:  # noqa: BLE001 - any failure is a model that does not fit
        raise ValueError(f"student {name!r} fails on the dataset's images [2, "
                         f"{', '.join(map(str, image_shape))}]: {type(err).__name__}: "
                         f"{err}") from err
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
    if shape != (2, num_classes):
        raise ValueError(f"student {name!r} maps images [2, {', '.join(map(str, image_shape))}] "
                         f"to {shape}, but logits must be [B, C] = [2, {num_classes}] "
                         f"({num_classes} classes): return the classifier's output only")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=128)
def _meta_model(name: str, num_classes: int, kwargs: tuple = ()) -> nn.Module:
    # On the meta device nothing is allocated or initialised: shapes only, ~ms per model.
    try:
        with torch.device("meta"):
            return create_model(name, num_classes, **dict(kwargs))
    except (NotImplementedError, RuntimeError):  # an outside class that needs real tensors
        return create_model(name, num_classes, **dict(kwargs))


def meta_model(name: str, num_classes: int = 1) -> nn.Module:
    """The arch built on the meta device (shapes and config only), cached per process."""
    return _meta_model(canonical_arch(name), num_classes)


def _frozen(kwargs: dict[str, Any] | None) -> tuple:
    return tuple(sorted((kwargs or {}).items()))


def param_count(name_or_alias: str, num_classes: int = 100, **kwargs: Any) -> int:
    return count_params(_meta_model(canonical_arch(name_or_alias), num_classes,
                                    _frozen(kwargs)))


def state_shapes(name_or_alias: str, num_classes: int = 100,
                 **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """state_dict key -> shape of the arch, without building real weights."""
    sd = _meta_model(canonical_arch(name_or_alias), num_classes, _frozen(kwargs)).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def feature_shapes(name_or_alias: str, image_size: int = 32, num_classes: int = 100,
                   **arch_kwargs: Any) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes of `forward(x, is_feat=True)[0]` for a square RGB input: the stage
    features, ending with the pooled feature (the classifier's input), on the meta device;
    `arch_kwargs` the constructor's keywords (`--student-kwargs dim=48`)."""
    return _feature_shapes(resolve_arch(name_or_alias), image_size, num_classes,
                           _frozen(arch_kwargs))


@lru_cache(maxsize=256)
def _feature_shapes(arch: str, image_size: int, num_classes: int,
                    kwargs: tuple) -> tuple[tuple[int, ...], ...]:
    model = _meta_model(arch, num_classes, kwargs)
    x = torch.empty(2, 3, image_size, image_size, device="meta")
    with torch.no_grad():
        feats, _ = model.eval()(x, is_feat=True)
    return tuple(tuple(f.shape[1:]) for f in feats)


def list_models(num_classes: int = 100) -> list[dict]:
    """One row per arch: {'name', 'aliases' (tuple), 'params' (int, at num_classes),
    'input_size' (pixels)}."""
    return [{"name": s.name, "aliases": s.aliases, "params": param_count(s.name, num_classes),
             "input_size": s.input_size} for s in _SPECS]

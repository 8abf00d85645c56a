"""Architectures built by the vision ecosystem: `timm:<model_name>` (timm builds it, no
weights downloaded) and `torchvision:<arch>` (torchvision's layout), with each one's input
configuration (resolution, normalisation) from the model's own config.

`torchvision:resnet18|resnet34|resnet50|mobilenet_v2` are ckd's own torchvision-layout
models (`ckd.models.imagenet`: the same state_dict keys and forward), so they need no
torchvision; other torchvision archs are built by torchvision when it imports.
Weights always come from a local file (`ckd.models.checkpoint`, `weights_only=True`).
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from .imagenet import mobilenet_v2, resnet18, resnet34, resnet50

PREFIXES = ("timm:", "torchvision:")
# torchvision's ImageNet weights: resize 256, center crop 224, ImageNet statistics
TORCHVISION_CONFIG = {"resolution": 224, "mean": (0.485, 0.456, 0.406),
                      "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
_OWN_TORCHVISION = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                    "mobilenet_v2": "mobilenet_v2"}


def is_external(name: Any) -> bool:
    """"timm:NAME" or "torchvision:ARCH"."""
    return isinstance(name, str) and name.strip().startswith(PREFIXES)


def split_external(name: str) -> tuple[str, str]:
    """"timm:vit_tiny_patch16_224" -> ("timm", "vit_tiny_patch16_224")."""
    kind, _, model = name.strip().partition(":")
    if not model:
        raise ValueError(f"{name!r}: name the model, e.g. timm:resnet50 or torchvision:resnet18")
    return kind, model


def import_timm() -> Any:
    try:
        import timm  # noqa: PLC0415 - optional at import time of ckd
    except Exception as err:  # noqa: BLE001 - timm also fails when torchvision cannot load
        raise ValueError(f"timm mentors need the timm package, which does not import here "
                         f"({type(err).__name__}: {err}): install it with `pip install timm` "
                         "(and a torchvision build matching your torch)") from err
    return timm


def _timm_model(model: str, num_classes: int, kwargs: dict) -> nn.Module:
    timm = import_timm()
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(f"timm has no model named {model!r}{hint}: `python -c \"import timm; "
                         f"print(timm.list_models('*{model.split('_')[0]}*'))\"` lists the "
                         "names")
    return timm.create_model(model, pretrained=False, num_classes=num_classes, **kwargs)


def _torchvision_model(model: str, num_classes: int, kwargs: dict) -> nn.Module:
    if model in _OWN_TORCHVISION and not kwargs:
        build = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
                 "mobilenet_v2": mobilenet_v2}[_OWN_TORCHVISION[model]]
        return build(num_classes)
    try:
        import torchvision  # noqa: PLC0415 - optional (torchvision: mentors only)
    except Exception as err:  # noqa: BLE001 - a torchvision built for another torch
        raise ValueError(f"torchvision:{model} needs torchvision, which does not import here "
                         f"({type(err).__name__}: {err}): install the build matching your "
                         f"torch, or use one of {', '.join(_OWN_TORCHVISION)} (no torchvision "
                         "needed)") from err
    names = torchvision.models.list_models(module=torchvision.models)
    if model not in names:
        close = difflib.get_close_matches(model, names, n=3)
        raise ValueError(f"torchvision has no classification model {model!r}"
                         f"{' (close: ' + ', '.join(close) + ')' if close else ''}: "
                         "`torchvision.models.list_models()` lists them")
    return torchvision.models.get_model(model, weights=None, num_classes=num_classes,
                                        **kwargs)


def build_external(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A freshly initialised model of "timm:NAME" / "torchvision:ARCH"."""
    kind, model = split_external(name)
    if kind == "timm":
        return _timm_model(model, num_classes, kwargs)
    return _torchvision_model(model, num_classes, kwargs)


def input_config(name: str, model: nn.Module | None = None) -> dict[str, Any] | None:
    """{'resolution', 'mean', 'std', 'crop_pct'} from the model's own config: timm's
    `pretrained_cfg` (any model carrying one, e.g. a module.path:Class built on timm), the
    torchvision convention for `torchvision:` archs; None when nothing says."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        size = cfg["input_size"]
        mean, std = cfg.get("mean") or (0.485, 0.456, 0.406), cfg.get("std") or (0.229, 0.224,
                                                                                 0.225)
        return {"resolution": int(size[-1]), "mean": tuple(map(float, mean)),
                "std": tuple(map(float, std)),
                "crop_pct": float(cfg.get("crop_pct") or 0.875)}
    if is_external(name) and split_external(name)[0] == "torchvision":
        return dict(TORCHVISION_CONFIG)
    return None

"""A stand-in for the `timm` package in tests (timm imports only beside a torchvision built
for the installed torch): its three functions ckd calls (is_model, list_models,
create_model returning a model with a `pretrained_cfg`), over two tiny ckd models whose
config says 32 px and statistics of their own. Tests with the real package run where it
imports (tests/test_mentor_specs.py::test_real_timm_mentor)."""

from __future__ import annotations

import types

import torch

from ckd.models import create_model

CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
       "crop_pct": 0.9}


class FixedSize(torch.nn.Module):
    """As timm's (non-dynamic) ViT: refuses an input size other than its own."""

    def __init__(self, net: torch.nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x, **kw):
        if x.shape[-1] != self.size:
            raise AssertionError(f"Input width ({x.shape[-1]}) doesn't match model "
                                 f"({self.size}).")
        return self.net(x, **kw)


BUILDS = {"test_vit": lambda nc: FixedSize(create_model("vit_tiny", nc, dim=24, depth=1,
                                                        heads=2), 32),
          "test_resnet": lambda nc: create_model("resnet8", nc)}


def create(name, pretrained=False, num_classes=1000, **kw):
    assert pretrained is False  # ckd never downloads weights
    model = BUILDS[name](num_classes)
    model.pretrained_cfg = dict(CFG)
    return model


def module() -> types.SimpleNamespace:
    return types.SimpleNamespace(is_model=lambda n: n in BUILDS,
                                 list_models=lambda: list(BUILDS), create_model=create)

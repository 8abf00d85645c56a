"""RepDistiller's weight initialisation for the zoo's ResNets, VGG, WRN and MobileNetV2
(one copy)."""

from __future__ import annotations

import math

from torch import nn


def fan_out_init(model: nn.Module, linear_std: float | None) -> None:
    """Convs N(0, sqrt(2 / fan_out)) with zero bias, unit BatchNorm, Linear bias zero and
    weight N(0, linear_std) (PyTorch's default weight init when `linear_std` is None)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def init_resnet_weights(model: nn.Module) -> None:
    """He et al.'s init as RepDistiller and torchvision use it: kaiming fan_out for convs,
    unit BatchNorm; Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


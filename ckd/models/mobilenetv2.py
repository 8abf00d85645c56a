"""MobileNetV2 at width 0.5, expansion 6 (RepDistiller's `mobile_half`), with its module
layout: conv1.{0,1}, blocks.i.j.conv.{0,1,3,4,6,7}, conv2.{0,1}, classifier.0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ckd.models.init import fan_out_init


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, 1, 0, bias=False),  # pointwise expand
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),  # depthwise
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, 1, 0, bias=False),  # pointwise linear
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, expand: int = 6, width: float = 0.5) -> None:
        super().__init__()
        # (expansion, channels, repeats, first stride) per stage
        stages = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
                  (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in stages:
            cout = int(c * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` RepDistiller's ([f0, ..., f4, pooled], logits): the stem and
        the outputs of blocks 1, 2, 4 and 6 (`preact` changes nothing, as in RepDistiller)."""
        f0 = self.conv1(x)
        x, feats = f0, [f0]
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in (1, 2, 4, 6):
                feats.append(x)
        # RepDistiller: AvgPool2d(2, ceil_mode=True) on the 2x2 map of a 32x32 input.
        pooled = torch.flatten(F.avg_pool2d(self.conv2(x), 2, ceil_mode=True), 1)
        logits = self.classifier(pooled)
        if not is_feat:
            return logits
        return [*feats, pooled], logits

def mobilenetv2_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, expand=6, width=0.5)

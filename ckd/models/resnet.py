"""CIFAR ResNets (He et al.) with RepDistiller's module layout.

Module names (conv1, bn1, layer1..3, downsample.0/1, fc) are kept identical to
RepDistiller's `models/resnet.py` so that its checkpoints load with strict key matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_resnet_weights
from .layers import global_avg_pool


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)



def staged_forward(f0: torch.Tensor, x: torch.Tensor, stages, fc: nn.Module,
                   is_feat: bool, preact: bool):
    """The ResNet families' shared tail: run `stages` from `x`, keeping each stage's output
    (and its pre-ReLU sum, from the last block's `forward_preact`), global-average-pool,
    classify. Returns logits, or RepDistiller's ([f0, stage outputs..., pooled], logits)."""
    feats, pre = [f0], [f0]
    for stage in stages:
        x, x_pre = stage[-1].forward_preact(stage[:-1](x))
        feats.append(x)
        pre.append(x_pre)
    pooled = global_avg_pool(x)
    logits = fc(pooled)
    if not is_feat:
        return logits
    return [*(pre if preact else feats), pooled], logits

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the sum before the final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class ResNet(nn.Module):
    """depth = 6n + 2 basic-block ResNet; `widths` = (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int],
                 num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self._cin = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[1], n, stride=1)
        self.layer2 = self._stage(widths[2], n, stride=2)
        self.layer3 = self._stage(widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_resnet_weights(self)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._cin != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._cin, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self._cin, planes, stride, downsample)]
        self._cin = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` RepDistiller's ([f0, f1, f2, f3, pooled], logits), where
        f1..f3 are the stage outputs (their pre-ReLU sums with `preact`)."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        # Global average pool (RepDistiller uses AvgPool2d(8), identical at 32x32 input).
        return staged_forward(f0, f0, (self.layer1, self.layer2, self.layer3), self.fc,
                              is_feat, preact)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet(depth: int, wide: bool = False, num_classes: int = 100) -> ResNet:
    return ResNet(depth, _WIDE if wide else _THIN, num_classes=num_classes)

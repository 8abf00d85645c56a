"""Wide ResNets (Zagoruyko & Komodakis) with RepDistiller's module layout
(conv1, blockK.layer.i.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ckd.models.init import fan_out_init
from ckd.models.layers import global_avg_pool


class WideBlock(nn.Module):
    """Pre-activation block; a 1x1 `convShortcut` only when the width changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = cin == cout
        self.convShortcut = (
            None if self.equal_in_out
            else nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # Like the original: with a width change the shortcut sees the pre-activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        ch = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        fan_out_init(self, linear_std=None)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` RepDistiller's ([f0, f1, f2, f3, pooled], logits): the stem
        and the three block outputs; with `preact` f1..f3 pass through the BatchNorm that
        follows them (as RepDistiller does, which in train mode also updates its stats)."""
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        pooled = global_avg_pool(F.relu(self.bn1(f3)))
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        if preact:
            f1 = self.block2.layer[0].bn1(f1)
            f2 = self.block3.layer[0].bn1(f2)
            f3 = self.bn1(f3)
        return [f0, f1, f2, f3, pooled], logits


def wrn(depth: int, widen: int, num_classes: int = 100) -> WideResNet:
    return WideResNet(depth, widen, num_classes=num_classes)

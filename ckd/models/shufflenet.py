"""ShuffleNet V1 (g=3) and V2 (1x) for CIFAR with RepDistiller's module layout
(conv1, bn1, layer1..3.i.{convK,bnK}, [conv2, bn2,] linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ckd.models.layers import global_avg_pool


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class V1Block(nn.Module):
    """Group-conv bottleneck; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 4
        self.g1 = 1 if cin == 24 else groups  # the stem output is not grouped
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the sum/concatenation before the final ReLU)."""
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (240, 480, 960),
                 repeats: tuple[int, ...] = (4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        stages = []
        for width, n in zip(widths, repeats, strict=True):
            blocks = []
            for i in range(n):
                # the first block concatenates its input, so its branch makes width - cin
                blocks.append(V1Block(cin, width - cin if i == 0 else width,
                                      2 if i == 0 else 1, groups))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` RepDistiller's ([f0, f1, f2, f3, pooled], logits)."""
        return _staged_forward(self, x, is_feat, preact, head=None)


def _staged_forward(net: nn.Module, x: torch.Tensor, is_feat: bool, preact: bool, head):
    """Shared ShuffleNet forward: stem, three stages (the last block of each also gives its
    pre-ReLU tensor), optional head conv, global average pool (avg_pool2d(4) at 32x32)."""
    f0 = F.relu(net.bn1(net.conv1(x)))
    x, feats, pre = f0, [f0], [f0]
    for stage in (net.layer1, net.layer2, net.layer3):
        x, x_pre = stage[-1].forward_preact(stage[:-1](x))
        feats.append(x)
        pre.append(x_pre)
    if head is not None:
        x = head(x)
    pooled = global_avg_pool(x)
    logits = net.linear(pooled)
    if not is_feat:
        return logits
    return [*(pre if preact else feats), pooled], logits


class V2Block(nn.Module):
    """Channel split: half passes through, half goes 1x1 -> dw3x3 -> 1x1; then shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, RepDistiller's preact: the pass-through half next to the branch before
        its last ReLU, unshuffled)."""
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        return out, torch.cat([x1, pre], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class V2Down(nn.Module):
    """Stride-2 unit: both branches see the full input; outputs concatenated."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (116, 232, 464, 1024),
                 repeats: tuple[int, ...] = (3, 7, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        stages = []
        for width, n in zip(widths[:3], repeats, strict=True):
            stages.append(nn.Sequential(V2Down(cin, width), *[V2Block(width) for _ in range(n)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` RepDistiller's ([f0, f1, f2, f3, pooled], logits)."""
        return _staged_forward(self, x, is_feat, preact,
                               head=lambda t: F.relu(self.bn2(self.conv2(t))))

"""CIFAR VGG with batch norm (RepDistiller's vggN_bn): five conv blocks block0..block4,
each a Sequential of [conv(bias), bn, relu]*k with the final relu dropped (applied in
forward), global average pool, one Linear `classifier`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ckd.models.init import fan_out_init
from ckd.models.layers import global_avg_pool

# Channels per conv layer in each of the five blocks.
VGG_CFGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(widths: tuple[int, ...], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w),
                   nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        cins = (3,) + tuple(c[-1] for c in cfg[:-1])
        self.block0 = _block(cfg[0], cins[0])
        self.block1 = _block(cfg[1], cins[1])
        self.block2 = _block(cfg[2], cins[2])
        self.block3 = _block(cfg[3], cins[3])
        self.block4 = _block(cfg[4], cins[4])
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits; with `is_feat` RepDistiller's ([f0, ..., f4, pooled], logits): the five
        block outputs after their ReLU (f1..f4 before it with `preact`), before pooling."""
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        feats, pre = [f0], [f0]
        x = F.max_pool2d(f0, 2)
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4)):
            x_pre = block(x)
            x = F.relu(x_pre)
            feats.append(x)
            pre.append(x_pre)
            # max-pool after blocks 1 and 2; after block 3 only for 64x64 inputs (RepDistiller)
            if i < 2 or (i == 2 and h == 64):
                x = F.max_pool2d(x, 2)
        pooled = global_avg_pool(x)
        logits = self.classifier(pooled)
        if not is_feat:
            return logits
        return [*(pre if preact else feats), pooled], logits

def vgg(depth: int, num_classes: int = 100) -> VGG:
    return VGG(VGG_CFGS[depth], num_classes=num_classes)

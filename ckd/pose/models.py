"""Pose models: a zoo CNN backbone with a SimCC head or a heatmap head.

Names: `<backbone>-simcc` or `<backbone>-heatmap`, the backbone any zoo CNN name or alias
(`resnet8-simcc`, `r20-heatmap`, `wrn_16_2-simcc`, ...), or `module.path:Class` for an
outside nn.Module (constructed with `num_joints` and `input_size` when its constructor
takes them).

Outputs (the field's conventions):
- SimCC (RTMPose): a tuple (x [N, K, Dx], y [N, K, Dy]) of logits over coordinate bins,
  Dx = W * split_ratio, Dy = H * split_ratio (ratio 2.0 as RTMPose). Head: a 1x1 conv to K
  maps, each flattened and mapped by two Linear layers (shared over joints) to the bins.
- heatmap (SimpleBaseline style): [N, K, H / stride, W / stride]. Head: stride-2
  transposed convolutions (4x4, BN, ReLU) up from the backbone's last stage, then a 1x1
  conv to K maps.

Both are rows of logits: `pose_rows` flattens either into [N, K, D] with D = Dx + Dy or
H' * W', the layout the loss and the cache use.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ckd.models.registry import (
    arch_spec,
    create_model,
    import_model_class,
    is_import_path,
    resolve_arch,
)
from ckd.models.wrn import WideResNet

HEADS = ("simcc", "heatmap")
SPLIT_RATIO = 2.0
HEATMAP_STRIDE = 2


@dataclass(frozen=True)
class Layout:
    """What a pose model's rows hold: kind 'simcc' with dims (Dx, Dy), or 'heatmap' with
    dims (H', W'); `num_joints` K."""

    kind: str
    num_joints: int
    dims: tuple[int, int]

    @property
    def row_size(self) -> int:
        a, b = self.dims
        return a + b if self.kind == "simcc" else a * b

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_joints": self.num_joints, "dims": list(self.dims)}


def _stage_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map (the classifier's input before pooling)."""
    feats, _ = backbone(x, is_feat=True)
    last = [f for f in feats if f.dim() == 4][-1]
    if isinstance(backbone, WideResNet):  # its last block output precedes a BN + ReLU
        return F.relu(backbone.bn1(last))
    return last


def _drop_classifier(backbone: nn.Module, path: str) -> None:
    """Replace the backbone's classifier (unused by pose heads) with an identity."""
    *parents, last = path.split(".")
    mod = backbone
    for part in parents:
        mod = getattr(mod, part)
    if isinstance(mod, nn.Sequential):
        mod[int(last)] = nn.Identity()
    else:
        setattr(mod, last, nn.Identity())


class PoseNet(nn.Module):
    def __init__(self, backbone: str, head: str, num_joints: int,
                 input_size: tuple[int, int], split_ratio: float = SPLIT_RATIO,
                 heatmap_stride: int = HEATMAP_STRIDE) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"pose head must be one of {HEADS}, got {head!r}")
        self.head_kind, self.num_joints = head, int(num_joints)
        self.input_size = tuple(int(v) for v in input_size)
        self.backbone = create_model(backbone, num_classes=1)
        _drop_classifier(self.backbone, arch_spec(backbone).classifier)
        h, w = self.input_size
        try:
            with torch.no_grad():
                probe = _stage_features(self.backbone.eval(), torch.zeros(1, 3, h, w))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"backbone {backbone} does not run on {h}x{w} inputs ({err}); "
                             "use a ResNet or WRN backbone (resnet8, resnet20, wrn_16_2, "
                             "...)") from err
        self.backbone.train()
        c, fh, fw = (int(v) for v in probe.shape[1:])
        if head == "simcc":
            self.split_ratio = float(split_ratio)
            self.to_joints = nn.Conv2d(c, num_joints, 1)
            self.cls_x = nn.Linear(fh * fw, int(round(w * split_ratio)))
            self.cls_y = nn.Linear(fh * fw, int(round(h * split_ratio)))
        else:
            self.heatmap_stride = int(heatmap_stride)
            ups = int(round(math.log2(max(1.0, (h / fh) / heatmap_stride))))
            layers: list[nn.Module] = []
            for _ in range(ups):
                layers += [nn.ConvTranspose2d(c, 64, 4, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
                c = 64
            self.deconv = nn.Sequential(*layers)
            self.to_joints = nn.Conv2d(c, num_joints, 1)

    def forward(self, x: torch.Tensor):
        f = _stage_features(self.backbone, x)
        if self.head_kind == "simcc":
            maps = self.to_joints(f).flatten(2)  # [N, K, h*w]
            return self.cls_x(maps), self.cls_y(maps)
        return self.to_joints(self.deconv(f))


def split_pose_name(name: str) -> tuple[str, str]:
    """"resnet8-simcc" -> ("resnet8", "simcc")."""
    base, _, head = name.strip().rpartition("-")
    if head.lower() not in HEADS or not base:
        raise ValueError(f"pose model {name!r}: name a zoo backbone with a head, "
                         f"<backbone>-simcc or <backbone>-heatmap (e.g. resnet8-simcc), or "
                         "module.path:Class")
    return resolve_arch(base), head.lower()


def create_pose_model(name: str, num_joints: int, input_size: tuple[int, int],
                      **kwargs) -> nn.Module:
    if is_import_path(name):  # the registry builds it (and names bad keyword arguments)
        try:
            params = inspect.signature(import_model_class(name)).parameters
        except (TypeError, ValueError):
            params = {}
        extra = {k: v for k, v in (("num_joints", num_joints), ("input_size", input_size))
                 if k in params and k not in kwargs}
        return create_model(name, 1, **kwargs, **extra)
    backbone, head = split_pose_name(name)
    return PoseNet(backbone, head, num_joints, input_size, **kwargs)


def pose_rows(out) -> tuple[torch.Tensor, Layout]:
    """A pose model's output -> (rows [N, K, D], layout)."""
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(
            torch.is_tensor(t) and t.dim() == 3 for t in out):
        x, y = out
        if x.shape[:2] != y.shape[:2]:
            raise ValueError(f"SimCC outputs disagree on [N, K]: x {tuple(x.shape)}, "
                             f"y {tuple(y.shape)}")
        return torch.cat([x, y], 2), Layout("simcc", int(x.shape[1]),
                                            (int(x.shape[2]), int(y.shape[2])))
    if torch.is_tensor(out) and out.dim() == 4:
        n, k, h, w = out.shape
        return out.reshape(n, k, h * w), Layout("heatmap", int(k), (int(h), int(w)))
    shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
    raise ValueError(f"a pose model returns (x [N, K, Dx], y [N, K, Dy]) logits (SimCC) or "
                     f"heatmaps [N, K, H, W]; got {shape}")


def probe_layout(model: nn.Module, name: str, num_joints: int,
                 input_size: tuple[int, int]) -> Layout:
    """Run two blank inputs through `model` and check its rows fit the dataset: K joints,
    SimCC bins proportional to the input (Dx / W == Dy / H), heatmaps at an integer
    stride. Raises one line naming the fix."""
    h, w = input_size
    dev = next(model.parameters(), torch.zeros(0)).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, layout = pose_rows(model(torch.zeros(2, 3, h, w, device=dev)))
    finally:
        model.train(was)
    if layout.num_joints != num_joints:
        raise ValueError(f"pose model {name!r} outputs {layout.num_joints} joints but the "
                         f"dataset has {num_joints}: build it with num_joints={num_joints}")
    check_bins(layout, input_size, f"pose model {name!r}")
    return layout


def check_bins(layout: Layout, input_size: tuple[int, int], who: str) -> None:
    h, w = input_size
    a, b = layout.dims
    if layout.kind == "simcc":
        if a % w or b % h or a // w != b // h or a < w:
            raise ValueError(f"{who}: SimCC bins (Dx, Dy) = ({a}, {b}) do not match the input "
                             f"{h}x{w}: need Dx = W * r and Dy = H * r for one integer split "
                             f"ratio r (RTMPose: r = 2 -> ({2 * w}, {2 * h}))")
    elif h % a or w % b or h // a != w // b:
        raise ValueError(f"{who}: heatmaps {a}x{b} are not the input {h}x{w} divided by one "
                         "integer stride; change the head's upsampling")

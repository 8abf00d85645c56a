"""Pose models: SimCC and heatmap heads on zoo backbones, outside module.path:Class pose
models, and the layout checks (joints, SimCC bins, heatmap stride)."""

import sys
import textwrap

import pytest
import torch

from ckd.pose.models import Layout, check_bins, create_pose_model, pose_rows, probe_layout

MODULE = """
import torch
from torch import nn

class TinySimCC(nn.Module):
    def __init__(self, num_joints, input_size, bins_per_pixel=2):
        super().__init__()
        h, w = input_size
        self.k = num_joints
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 32))
        self.x = nn.Linear(32, num_joints * w * bins_per_pixel)
        self.y = nn.Linear(32, num_joints * h * bins_per_pixel)

    def forward(self, img):
        f = self.body(img)
        return self.x(f).view(len(img), self.k, -1), self.y(f).view(len(img), self.k, -1)
"""


@pytest.fixture
def outside(tmp_path, monkeypatch):
    (tmp_path / "posepkg.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "posepkg"
    sys.modules.pop("posepkg", None)


@pytest.mark.parametrize("name,kind,dims", [("resnet8-simcc", "simcc", (96, 128)),
                                            ("r8-heatmap", "heatmap", (32, 24)),
                                            ("wrn_16_1-simcc", "simcc", (96, 128))])
def test_zoo_pose_models(name, kind, dims):
    torch.manual_seed(0)
    m = create_pose_model(name, 13, (64, 48))
    layout = probe_layout(m, name, 13, (64, 48))
    assert layout == Layout(kind, 13, dims)
    rows, lay = pose_rows(m(torch.randn(3, 3, 64, 48)))
    assert rows.shape == (3, 13, layout.row_size) and lay == layout
    rows.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_outside_pose_model_and_layout_errors(outside):
    m = create_pose_model(f"{outside}:TinySimCC", 5, (32, 24))
    assert probe_layout(m, "t", 5, (32, 24)) == Layout("simcc", 5, (48, 64))
    with pytest.raises(ValueError, match="outputs 5 joints but the dataset has 13"):
        probe_layout(m, "t", 13, (32, 24))
    with pytest.raises(ValueError, match="SimCC bins .* do not match the input 40x24"):
        probe_layout(m, "t", 5, (40, 24))
    odd = create_pose_model(f"{outside}:TinySimCC", 5, (32, 24), bins_per_pixel=1)
    odd.y = torch.nn.Linear(32, 5 * 40)  # y bins no longer H * ratio
    with pytest.raises(ValueError, match="SimCC bins"):
        probe_layout(odd, "t", 5, (32, 24))
    with pytest.raises(ValueError, match="heatmaps 10x7"):
        check_bins(Layout("heatmap", 5, (10, 7)), (32, 24), "x")
    with pytest.raises(ValueError, match="<backbone>-simcc"):
        create_pose_model("resnet8", 5, (32, 24))
    with pytest.raises(ValueError, match="unknown architecture"):
        create_pose_model("nosuchnet-simcc", 5, (32, 24))

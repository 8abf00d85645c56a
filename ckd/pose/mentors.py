"""Pose mentors and views shared by the pose cache and the pose trainer: the keyed views of
a batch, a frozen pose model with its ranking key, and pose checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ckd.atomic import atomic_save, safe_torch_load
from ckd.pose.coco import PoseDataset, PoseSplit
from ckd.pose.codec import joint_weights
from ckd.pose.metrics import rank_key, view_box_side
from ckd.pose.models import Layout, create_pose_model, pose_rows, probe_layout
from ckd.pose.views import apply_pose_views


def batch_views(ds: PoseDataset, split: PoseSplit, idx: torch.Tensor, params: torch.Tensor):
    """(input [B, 3, H, W], view keypoints [B, K, 3], joint weights [B, K], box side [B])."""
    i = idx.numpy()
    x, kps = apply_pose_views(torch.from_numpy(split.images[i]),
                              torch.from_numpy(split.keypoints[i]), params, ds.meta)
    norm = view_box_side(torch.from_numpy(split.boxes[i]), torch.from_numpy(split.crops[i]),
                         params, ds.meta)
    return x, kps, joint_weights(kps, ds.input_size), norm


# Every mentor forward runs on exactly MENTOR_BATCH inputs (the last piece zero-padded): CPU
# convolutions pick their algorithm by batch size, so rows computed in batches of other
# sizes differ in their last bits; at one fixed shape a row does not depend on its batch
# (position or neighbours), so cached rows equal online rows bit for bit.
MENTOR_BATCH = 16


def mentor_rows(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 rows [B, K, D] of a frozen pose model, computed MENTOR_BATCH inputs at a time."""
    out = []
    for a in range(0, len(x), MENTOR_BATCH):
        part = x[a:a + MENTOR_BATCH]
        n = len(part)
        if n < MENTOR_BATCH:
            part = torch.cat([part, part.new_zeros(MENTOR_BATCH - n, *part.shape[1:])])
        rows, _ = pose_rows(model(part))
        out.append(rows[:n].float())
    return torch.cat(out)


@dataclass
class PoseMentor:
    name: str
    model: nn.Module
    layout: Layout
    input_size: tuple[int, int]

    @torch.no_grad()
    def rows_and_key(self, x, view_kps, weight) -> tuple[torch.Tensor, torch.Tensor]:
        """The mentor's rows [B, K, D] on the views and its ranking key [B] (float32, as the
        cache stores it)."""
        rows = mentor_rows(self.model, x)
        return rows, rank_key(rows, self.layout, self.input_size, view_kps, weight).float()


def save_pose_checkpoint(path: Path, model: nn.Module, arch: str, kwargs: dict,
                         ds: PoseDataset, layout: Layout, metrics: dict) -> None:
    atomic_save({"arch": arch, "arch_kwargs": dict(kwargs), "num_joints": ds.num_joints,
                 "input_size": list(ds.input_size), "layout": layout.to_dict(),
                 "dataset": ds.name, "fingerprint": ds.meta["fingerprint"],
                 "metrics": metrics, "model": model.state_dict()}, path)


def load_pose_mentor(path: str | Path, ds: PoseDataset) -> PoseMentor:
    """A trained pose model (a `ckd pose train` student.pt), frozen, checked against `ds`."""
    ck = safe_torch_load(Path(path))
    if not isinstance(ck, dict) or "num_joints" not in ck:
        raise ValueError(f"{path}: not a pose checkpoint (train one with `ckd pose train`)")
    if int(ck["num_joints"]) != ds.num_joints:
        raise ValueError(f"mentor {path} predicts {ck['num_joints']} joints, the dataset "
                         f"{ds.name} has {ds.num_joints}: train the mentor on this keypoint "
                         "set")
    if tuple(ck["input_size"]) != tuple(ds.input_size):
        raise ValueError(f"mentor {path} takes {ck['input_size']} inputs, the dataset is "
                         f"prepared at {list(ds.input_size)}: prepare with the same "
                         "--input-size or retrain the mentor")
    model = create_pose_model(ck["arch"], ds.num_joints, ds.input_size, **ck["arch_kwargs"])
    model.load_state_dict(ck["model"])
    model.eval().requires_grad_(False)
    layout = probe_layout(model, str(path), ds.num_joints, ds.input_size)
    return PoseMentor(ck["arch"], model, layout, tuple(ds.input_size))

"""Keyed top-down views: random scale, rotation and horizontal flip (with the left/right
joint swap) of a stored person crop, warped to the model's input size, as a pure function
of (seed, sample index, slot) like the CIFAR and random-resized-crop views.

    slot seed    = epoch_seed(seed, slot)
    draw d of i  = hash32(slot seed, i * 8 + d), uniform 32-bit, d = 0..3
    scale        = SCALE[0] + u0 * (SCALE[1] - SCALE[0])     (> 1 zooms out)
    rotation     = (u1 * 2 - 1) * ROTATION degrees if u3 < ROTATE_PROB else 0
                   (positive = counter-clockwise as displayed)
    flip         = top bit of draw 2

A view maps stored-crop pixel p to input pixel q = S R (p - c_store) + c_input, with
S = (W_in / (W_store / CONTEXT)) / scale, R the rotation and c the pixel-centre image
centres ((W - 1) / 2, (H - 1) / 2); a flip then maps q_x to W_in - 1 - q_x and swaps
each left joint with its right twin. Slot -1 (`IDENTITY_SLOT`) is the un-augmented view
(scale 1, no rotation, no flip): evaluation.

Pixels: bilinear, zeros outside the crop, on the raw 0..255 values, then normalized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ckd.hashing import epoch_seed, hash32
from ckd.pose.coco import flip_permutation

SCALE = (0.75, 1.25)
ROTATION = 30.0
ROTATE_PROB = 0.6
DRAWS = 8  # counter stride per sample (4 used)
IDENTITY_SLOT = -1
RECIPE = {"name": "topdown-scale0.75-1.25-rot30p0.6-flip", "version": 1}
_TWO32 = float(1 << 32)


def view_params(seed: int, indices: torch.Tensor, slot: int) -> torch.Tensor:
    """float64 [B, 3] = (scale, rotation degrees, flip 0/1) of view `slot` of each sample."""
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if int(slot) == IDENTITY_SLOT:
        out = torch.zeros(len(idx), 3, dtype=torch.float64)
        out[:, 0] = 1.0
        return out
    u = hash32(epoch_seed(seed, slot), idx[:, None] * DRAWS + torch.arange(4))
    scale = SCALE[0] + (u[:, 0] / _TWO32) * (SCALE[1] - SCALE[0])
    rot = ((u[:, 1] / _TWO32) * 2.0 - 1.0) * ROTATION
    rot = torch.where(u[:, 3] / _TWO32 < ROTATE_PROB, rot, torch.zeros_like(rot))
    flip = (u[:, 2] >> 31).to(torch.float64)
    return torch.stack([scale.double(), rot.double(), flip], dim=1)


def view_matrices(params: torch.Tensor, store: Sequence[int], input_size: Sequence[int],
                  context: float) -> torch.Tensor:
    """float64 [B, 2, 3]: stored-crop pixel -> input pixel, flip included."""
    p = torch.as_tensor(params, dtype=torch.float64)
    hs, ws = (int(v) for v in store)
    h, w = (int(v) for v in input_size)
    s = (w / (ws / float(context))) / p[:, 0]
    th = p[:, 1] * (math.pi / 180.0)
    a, b = s * torch.cos(th), s * torch.sin(th)
    cs = torch.tensor([(ws - 1) / 2.0, (hs - 1) / 2.0], dtype=torch.float64)
    ci = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=torch.float64)
    lin = torch.stack([torch.stack([a, b], 1), torch.stack([-b, a], 1)], 1)  # [B, 2, 2]
    shift = ci - (lin @ cs)  # [B, 2]
    flip = p[:, 2] > 0.5
    lin[flip, 0] = -lin[flip, 0]
    shift[flip, 0] = (w - 1) - shift[flip, 0]
    return torch.cat([lin, shift[:, :, None]], dim=2)


def transform_keypoints(keypoints: torch.Tensor, mats: torch.Tensor, flip: torch.Tensor,
                        flip_perm: Sequence[int]) -> torch.Tensor:
    """Stored-crop keypoints [B, K, 3] (x, y, visibility) -> the view's [B, K, 3]: points
    mapped by `mats`, joints of flipped samples swapped left <-> right. Unlabelled joints
    (visibility 0) stay 0 0 0."""
    kp = torch.as_tensor(keypoints, dtype=torch.float64)
    xy = kp[..., :2] @ mats[:, :, :2].transpose(1, 2) + mats[:, None, :, 2]
    vis = kp[..., 2:]
    out = torch.cat([torch.where(vis > 0, xy, torch.zeros_like(xy)), vis], dim=2)
    perm = torch.as_tensor(list(flip_perm), dtype=torch.int64)
    flipped = torch.as_tensor(flip).bool()
    out[flipped] = out[flipped][:, perm]
    return out


def warp_images(images_u8: torch.Tensor, mats: torch.Tensor, input_size: Sequence[int],
                ) -> torch.Tensor:
    """uint8 [B, Hs, Ws, 3] stored crops -> float32 [B, 3, H, W] warped raw values 0..255
    (bilinear, zeros outside), the inverse maps computed in float64."""
    b, hs, ws, _ = images_u8.shape
    h, w = (int(v) for v in input_size)
    m = mats.to(torch.float64)
    lin_inv = torch.linalg.inv(m[:, :, :2])
    shift_inv = -(lin_inv @ m[:, :, 2:])  # [B, 2, 1]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    q = torch.stack([xs, ys], -1).reshape(1, -1, 2)  # [1, H*W, 2]
    src = q @ lin_inv.transpose(1, 2) + shift_inv.transpose(1, 2)  # [B, H*W, 2]
    grid = torch.stack([src[..., 0] * (2.0 / (ws - 1)) - 1.0,
                        src[..., 1] * (2.0 / (hs - 1)) - 1.0], -1).reshape(b, h, w, 2)
    x = images_u8.permute(0, 3, 1, 2).to(torch.float32)
    return F.grid_sample(x, grid.to(x.device, torch.float32), mode="bilinear",
                         padding_mode="zeros", align_corners=True)


def apply_pose_views(images_u8: torch.Tensor, keypoints: torch.Tensor, params: torch.Tensor,
                     meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored crops + keypoints + view params -> (normalized input [B, 3, H, W] float32,
    view keypoints [B, K, 3] float64), as `meta` (a prepared pose set's meta.json) says."""
    mats = view_matrices(params, meta["store_size"], meta["input_size"], meta["context"])
    x = warp_images(images_u8, mats, meta["input_size"])
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    kps = transform_keypoints(keypoints, mats, params[:, 2], flip_permutation(meta["joints"]))
    return (x - mean.to(x.device)) / std.to(x.device), kps

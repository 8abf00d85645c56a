"""Random-resized-crop views as a pure function of (seed, sample index, slot).

`rrc_view(seed, i, k)` is torchvision's `RandomResizedCrop.get_params` (scale (0.08, 1),
ratio (3/4, 4/3), 10 attempts, then the center-crop fallback) followed by a horizontal
flip with probability 1/2, on image i's ORIGINAL size, with every random draw taken from
ckd's counter-based hash (`ckd.hashing.hash32`) instead of a global RNG:

    slot seed      = epoch_seed(seed, k)                 (as CIFAR's keyed slots)
    draw d of i    = hash32(slot seed, i * 64 + d)       d = 0..40, uniform 32-bit
    attempt t      : d = 4t (scale), 4t+1 (log ratio), 4t+2 (top), 4t+3 (left)
    flip           : top bit of draw 40

A uniform float is `h / 2^32`; an integer in [0, n) is `(h * n) >> 32` (multiply-shift).
Boxes are (top, left, height, width) in original pixels. Images stored smaller than their
original (`ckd prepare imagefolder --max-side`) are cropped at `stored_box`, the same box
scaled by integer arithmetic, so a view does not depend on the storage resolution.

A training run seeded s replays, in epoch e, slot `epoch_slots(s, e, i, K)` of sample i:
`hash32(epoch_seed(s, e), i)` reduced to 0..K-1, independent of world and batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ckd.hashing import epoch_seed, hash32

from .views import normalize

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10
DRAWS_PER_VIEW = 64  # counter stride per sample: 41 draws used, room left for more
FLIP_DRAW = 4 * ATTEMPTS
RECIPE = {"name": "rrc-0.08-1-flip", "version": 1}
_TWO32 = float(1 << 32)


def draws(seed: int, indices: torch.Tensor, slot: int) -> torch.Tensor:
    """The 41 uniform 32-bit draws of view `slot` of each sample: int64 [B, 41]."""
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    counters = idx[:, None] * DRAWS_PER_VIEW + torch.arange(FLIP_DRAW + 1)
    return hash32(epoch_seed(seed, slot), counters)


def boxes_from_draws(h32: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                     ) -> torch.Tensor:
    """torchvision's get_params, vectorized over samples: draws [B, 41] + sizes [B] ->
    int64 [B, 5] = (top, left, height, width, flip)."""
    height = torch.as_tensor(heights, dtype=torch.int64).reshape(-1)
    width = torch.as_tensor(widths, dtype=torch.int64).reshape(-1)
    area = (height * width).to(torch.float64)[:, None]
    u = h32[:, :FLIP_DRAW].reshape(-1, ATTEMPTS, 4)
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    target_area = area * (SCALE[0] + (u[..., 0] / _TWO32) * (SCALE[1] - SCALE[0]))
    aspect = torch.exp(lo + (u[..., 1] / _TWO32) * (hi - lo))
    # torch.round rounds half to even, as Python's round() in torchvision does.
    w = torch.round(torch.sqrt(target_area * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target_area / aspect)).to(torch.int64)
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    top = (u[..., 2] * (height[:, None] - h + 1).clamp(min=1)) >> 32
    left = (u[..., 3] * (width[:, None] - w + 1).clamp(min=1)) >> 32
    first = ok.to(torch.int8).argmax(dim=1)  # first successful attempt
    found = ok.any(dim=1)
    pick = first[:, None]
    box = torch.stack([top.gather(1, pick)[:, 0], left.gather(1, pick)[:, 0],
                       h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]], dim=1)
    # Fallback: the central crop of the largest in-range aspect ratio.
    in_ratio = width.to(torch.float64) / height.to(torch.float64)
    fw = torch.where(in_ratio > RATIO[1],
                     torch.round(height.to(torch.float64) * RATIO[1]).to(torch.int64), width)
    fh = torch.where(in_ratio < RATIO[0],
                     torch.round(width.to(torch.float64) / RATIO[0]).to(torch.int64), height)
    fallback = torch.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], dim=1)
    box = torch.where(found[:, None], box, fallback)
    flip = h32[:, FLIP_DRAW] >> 31
    return torch.cat([box, flip[:, None]], dim=1)


def rrc_views(seed: int, indices: torch.Tensor, slot: int, heights: torch.Tensor,
              widths: torch.Tensor) -> torch.Tensor:
    """View `slot` of samples `indices` with original sizes (heights, widths): int64
    [B, 5] = (top, left, height, width, flip) in original pixels."""
    return boxes_from_draws(draws(seed, indices, slot), heights, widths)


def rrc_view(seed: int, i: int, k: int, height: int, width: int) -> tuple[int, ...]:
    """One view: (top, left, height, width, flip) of slot k of sample i (original pixels)."""
    row = rrc_views(seed, torch.tensor([int(i)]), int(k), torch.tensor([int(height)]),
                    torch.tensor([int(width)]))[0]
    return tuple(int(v) for v in row)


def epoch_slots(seed: int, epoch: int, indices: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Slot in 0..K-1 that epoch `epoch` of a run seeded `seed` replays for each sample."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    idx = torch.as_tensor(indices, dtype=torch.int64)
    return (hash32(epoch_seed(seed, epoch), idx) * int(num_slots)) >> 32


class RandomResizedCrops:
    """The random-resized-crop recipe as a `ckd.data.protocol.ViewRecipe`: continuous
    views, so a run from a cache replays its K slots (`epoch_slots`) and a run without one
    draws slot e in epoch e (`epoch_view_ids`); a view is (slot, sample), whose box the cache
    stores, and the loader crops it at the student's size."""

    record = RECIPE
    num_views = None

    def epoch_view_ids(self, seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        """Without a cache (online mentors, a mentor trained from scratch) every view is
        available: epoch e shows sample i a fresh keyed crop, slot e of the draws
        (`rrc_views(seed, i, e)`), so the view of (e, i) is named by its slot, e."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return torch.full_like(idx, int(epoch))

    def epoch_slots(self, seed: int, epoch: int, indices: torch.Tensor,
                    num_slots: int) -> torch.Tensor:
        return epoch_slots(seed, epoch, indices, num_slots)

    def student_input(self, images: torch.Tensor, view_ids: torch.Tensor,
                      mean: Sequence[float], std: Sequence[float], *,
                      channels_last: bool = False) -> torch.Tensor:
        """The batch is already the replayed crops: normalized only."""
        x = normalize(images, mean, std).permute(0, 3, 1, 2)
        return x if channels_last else x.contiguous()


RRC = RandomResizedCrops()


def stored_box(boxes: torch.Tensor, orig_hw: torch.Tensor, stored_hw: torch.Tensor,
               ) -> torch.Tensor:
    """Boxes [B, 5] in original pixels -> int64 [B, 5] = (y0, x0, y1, x1, flip) in the
    stored image's pixels: edges scaled by stored/original (floor at the start, ceil at the
    end, at least one pixel), exact integer arithmetic."""
    boxes = torch.as_tensor(boxes, dtype=torch.int64)
    oh, ow = (torch.as_tensor(orig_hw, dtype=torch.int64)[:, j] for j in (0, 1))
    sh, sw = (torch.as_tensor(stored_hw, dtype=torch.int64)[:, j] for j in (0, 1))
    top, left, h, w, flip = boxes.unbind(1)
    y0 = top * sh // oh
    x0 = left * sw // ow
    y1 = torch.maximum(-((-(top + h) * sh) // oh), y0 + 1).minimum(sh)
    x1 = torch.maximum(-((-(left + w) * sw) // ow), x0 + 1).minimum(sw)
    return torch.stack([y0, x0, y1, x1, flip], dim=1)

"""Rows of joint logits <-> coordinates: targets, decoding and the flip test.

A row of K joint logits is cut into segments: SimCC rows into x bins [0, Dx) and y bins
[Dx, Dx + Dy), heatmap rows into one segment of H' * W' cells. Cell j of an axis with n
cells over an input side of L pixels stands for the pixel-centre coordinate
`(j + 0.5) * L / n - 0.5`, so a horizontal flip of the input reverses the x cells exactly
(SimCC bins and heatmap columns alike).

Targets are Gaussians (sigma in cells) normalized to sum 1 per segment; the student's task
loss is their cross-entropy with the segment's softmax (RTMPose's SimCC loss without label
smoothing; heatmap heads trained the same way, so their outputs are logits too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ckd.pose.models import Layout

SIGMA = 2.0  # target Gaussian width in cells (bins / heatmap pixels)


def segments(layout: Layout) -> list[tuple[int, int]]:
    if layout.kind == "simcc":
        dx, dy = layout.dims
        return [(0, dx), (dx, dx + dy)]
    return [(0, layout.row_size)]


def _cell_coord(j: torch.Tensor, cells: int, side: int) -> torch.Tensor:
    return (j.to(torch.float64) + 0.5) * (side / cells) - 0.5


def _coord_cell(x: torch.Tensor, cells: int, side: int) -> torch.Tensor:
    return (x.to(torch.float64) + 0.5) * (cells / side) - 0.5


def _gauss(centre: torch.Tensor, cells: int, sigma: float) -> torch.Tensor:
    grid = torch.arange(cells, dtype=torch.float64)
    g = torch.exp(-0.5 * ((grid - centre[..., None]) / sigma) ** 2)
    return g / g.sum(-1, keepdim=True).clamp_min(1e-300)


def targets(kps: torch.Tensor, layout: Layout, input_size: Sequence[int],
            sigma: float = SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """View keypoints [N, K, 3] -> (target rows [N, K, D] float32, weights [N, K]): weight 1
    for a labelled joint inside the input, else 0."""
    h, w = (int(v) for v in input_size)
    kps = torch.as_tensor(kps, dtype=torch.float64)
    x, y = kps[..., 0], kps[..., 1]
    weight = joint_weights(kps, input_size)
    if layout.kind == "simcc":
        dx, dy = layout.dims
        rows = torch.cat([_gauss(_coord_cell(x, dx, w), dx, sigma),
                          _gauss(_coord_cell(y, dy, h), dy, sigma)], -1)
    else:
        hh, ww = layout.dims
        gy = _gauss(_coord_cell(y, hh, h), hh, sigma)
        gx = _gauss(_coord_cell(x, ww, w), ww, sigma)
        rows = (gy[..., :, None] * gx[..., None, :]).flatten(-2)
    return rows.float(), weight


def joint_weights(kps: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """[N, K] float32: 1 for a labelled joint inside the input, else 0."""
    h, w = (int(v) for v in input_size)
    x, y, v = kps[..., 0], kps[..., 1], kps[..., 2]
    inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    return ((v > 0) & inside).float()


def decode(rows: torch.Tensor, layout: Layout, input_size: Sequence[int],
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [N, K, D] -> (argmax coordinates [N, K, 2] float64 in input pixels, confidence
    [N, K]: the mean over segments of the segment softmax's peak)."""
    h, w = (int(v) for v in input_size)
    rows = rows.detach().float()
    if layout.kind == "simcc":
        dx, dy = layout.dims
        px, py = rows[..., :dx].softmax(-1), rows[..., dx:].softmax(-1)
        cx, jx = px.max(-1)
        cy, jy = py.max(-1)
        xy = torch.stack([_cell_coord(jx, dx, w), _cell_coord(jy, dy, h)], -1)
        return xy, (cx + cy).double() / 2
    hh, ww = layout.dims
    p = rows.softmax(-1)
    conf, j = p.max(-1)
    xy = torch.stack([_cell_coord(j % ww, ww, w), _cell_coord(j // ww, hh, h)], -1)
    return xy, conf.double()


def flip_rows(rows: torch.Tensor, layout: Layout, flip_perm: Sequence[int]) -> torch.Tensor:
    """The rows a horizontally flipped input's rows stand for in the unflipped frame:
    x cells reversed, left and right joints swapped."""
    perm = torch.as_tensor(list(flip_perm), dtype=torch.int64, device=rows.device)
    if layout.kind == "simcc":
        dx, _ = layout.dims
        out = torch.cat([rows[..., :dx].flip(-1), rows[..., dx:]], -1)
    else:
        hh, ww = layout.dims
        out = rows.reshape(*rows.shape[:-1], hh, ww).flip(-1).reshape(rows.shape)
    return out[:, perm]

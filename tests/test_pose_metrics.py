"""PCK and COCO AP on hand-made cases (AP against the textbook OKS and pycocotools'
101-point interpolation), the codec's targets/decoding and flip, coordinate round trips."""

import math

import numpy as np
import pytest
import torch

from ckd.pose.codec import decode, flip_rows, targets
from ckd.pose.metrics import coco_ap, input_to_original, pck, stored_to_original
from ckd.pose.models import Layout
from ckd.pose.views import transform_keypoints, view_matrices, view_params


def test_pck_hand_made():
    gt = torch.tensor([[[10.0, 10.0, 2], [20.0, 20.0, 2], [30.0, 30.0, 0], [5.0, 5.0, 1]],
                       [[0.0, 0.0, 0], [0.0, 0.0, 0], [0.0, 0.0, 0], [0.0, 0.0, 0]]])
    pred = gt[..., :2].clone()
    pred[0, 0] += torch.tensor([3.0, 4.0])  # 5 px off: a hit under 0.2 * 30 = 6
    pred[0, 1] += torch.tensor([6.0, 0.0])  # exactly 6 px: a miss (strictly less)
    pred[0, 2] += 100.0  # unlabelled: not counted
    weight = (gt[..., 2] > 0).float()
    got = pck(pred, gt, weight, torch.tensor([30.0, 30.0]))
    assert got[0].item() == pytest.approx(2 / 3)
    assert math.isnan(got[1].item())


def _oks(d2: np.ndarray, area: float, sigmas: np.ndarray) -> float:
    return float(np.mean(np.exp(-d2 / (2 * area * (2 * sigmas) ** 2))))


def test_coco_ap_against_textbook_oks():
    k, area = 3, 1000.0
    sigmas = np.full(k, 0.05)
    gt = np.array([[[50.0, 50.0], [60.0, 70.0], [40.0, 80.0]],
                   [[150.0, 50.0], [160.0, 70.0], [140.0, 80.0]]])
    vis = np.array([[2, 2, 0], [2, 1, 2]])
    boxes = np.array([[30.0, 40.0, 40.0, 50.0], [130.0, 40.0, 40.0, 50.0]])
    pred = gt.copy()
    # person 0: OKS 0.97 on its two labelled joints (the unlabelled one is far off)
    d0 = math.sqrt(-2 * area * (2 * 0.05) ** 2 * math.log(0.97))
    pred[0, 0, 0] += d0
    pred[0, 1, 1] -= d0
    pred[0, 2] += 40.0
    # person 1: OKS 0.62
    d1 = math.sqrt(-2 * area * (2 * 0.05) ** 2 * math.log(0.62))
    pred[1, :, 0] += d1
    oks = [_oks(((pred[i] - gt[i]) ** 2).sum(1)[vis[i] > 0], area, sigmas[vis[i] > 0])
           for i in range(2)]
    assert oks == pytest.approx([0.97, 0.62])
    scores = np.array([0.9, 0.8])
    got = coco_ap(pred, scores, gt, vis, boxes, np.full(2, area), np.array([1, 1]), sigmas)
    thresholds = np.linspace(0.5, 0.95, 10)
    # both matched where OKS >= t (AP 1); else only the first (recall 1/2, precision 1:
    # 51 of the 101 recall points)
    per_t = [1.0 if t <= oks[1] else 51 / 101 for t in thresholds]
    assert got["AP"] == pytest.approx(np.mean(per_t))
    assert got["AP50"] == pytest.approx(1.0) and got["AP75"] == pytest.approx(51 / 101)
    perfect = coco_ap(gt, scores, gt, vis, boxes, np.full(2, area), np.array([1, 2]), sigmas)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AR"] == pytest.approx(1.0)


@pytest.mark.parametrize("layout", [Layout("simcc", 4, (48, 64)), Layout("heatmap", 4, (16, 12))])
def test_targets_decode_and_flip(layout):
    size = (32, 24)
    # coordinates at cell centres decode exactly
    cells_x = layout.dims[0] if layout.kind == "simcc" else layout.dims[1]
    cells_y = layout.dims[1] if layout.kind == "simcc" else layout.dims[0]
    jx, jy = torch.tensor([[3, 10, 11, 5]]), torch.tensor([[7, 1, 15, 11]])
    x = (jx + 0.5) * (24 / cells_x) - 0.5
    y = (jy + 0.5) * (32 / cells_y) - 0.5
    kps = torch.stack([x, y, torch.full_like(x, 2.0)], -1).double()
    rows, weight = targets(kps, layout, size)
    assert weight.tolist() == [[1.0] * 4]
    assert torch.allclose(rows.sum(-1), torch.full((1, 4), float(1 + (layout.kind == "simcc"))))
    xy, _ = decode(torch.log(rows + 1e-12), layout, size)
    assert torch.allclose(xy, kps[..., :2])
    # the flip: decoding flipped rows gives the mirrored, swapped coordinates
    perm = [1, 0, 2, 3]
    z = torch.randn(3, 4, layout.row_size)
    a, _ = decode(z, layout, size)
    b, _ = decode(flip_rows(z, layout, perm), layout, size)
    assert torch.allclose(b[:, :, 0], 23 - a[:, perm, 0])
    assert torch.allclose(b[:, :, 1], a[:, perm, 1])


def test_input_to_original_round_trip():
    meta = {"input_size": [32, 24], "store_size": [48, 36], "context": 1.5}
    crops = torch.tensor([[100.0, 80.0, 0.4], [10.0, 20.0, 1.3]])
    kps = torch.cat([torch.rand(2, 5, 2) * 30, torch.full((2, 5, 1), 2.0)], -1).double()
    ident = view_params(0, torch.arange(2), -1)
    mats = view_matrices(ident, meta["store_size"], meta["input_size"], meta["context"])
    view = transform_keypoints(kps, mats, ident[:, 2], list(range(5)))
    assert torch.allclose(input_to_original(view[..., :2], crops, meta),
                          stored_to_original(kps, crops, meta))


def test_rank_key_is_pck_at_005_of_the_input():
    from ckd.pose.metrics import rank_key

    layout, size = Layout("simcc", 4, (48, 64)), (32, 24)
    gt = torch.tensor([[[10.25, 10.25, 2], [10.25, 10.25, 2], [10.25, 10.25, 2],
                        [10.25, 10.25, 0]]], dtype=torch.float64)
    pred = gt.clone()
    pred[0, 0, 0] = 11.25  # 1.0 / 24 = 0.042 of the width: a hit
    pred[0, 1, 0] = 11.75  # 1.5 / 24 = 0.0625: a miss
    pred[0, 2, 1] = 11.75  # 1.5 / 32 = 0.047 of the height: a hit
    rows, _ = targets(pred, layout, size)
    key = rank_key(torch.log(rows + 1e-12), layout, size, gt, (gt[..., 2] > 0).float())
    assert key.tolist() == [pytest.approx(2 / 3)]

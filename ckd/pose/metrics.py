"""Pose metrics: PCK@0.2 (bbox-normalised) and COCO keypoint AP through pycocotools, on
flip-test-averaged predictions.

PCK of a sample = the fraction of its joints with weight > 0 (labelled, inside the view)
whose predicted position lies within `thr * max(box w, box h)` of the truth, the box side
measured in the same (input) pixels; NaN for a sample without such joints. A set's PCK is
the mean over all weighted joints of the set (joint-level, as mmpose's PCK accuracy).

COCO AP: the kept persons of a prepared split are the ground truth (keypoints, area,
box, iscrowd 0), one detection per person (top-down with ground-truth boxes) with the
predicted keypoints mapped back to original pixels, score = mean joint confidence;
OKS sigmas from the prepared set's meta (COCO's for COCO's joint names).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch

from ckd.pose.codec import decode

THRESHOLD = 0.2


def pck_hits(pred: torch.Tensor, gt: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor,
             thr: float = THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct joints [N], weighted joints [N]) for predictions [N, K, 2], truth [N, K, >=2],
    weights [N, K] and box sides [N] (input pixels)."""
    dist = (pred.double() - gt[..., :2].double()).norm(dim=-1)
    valid = weight > 0
    hit = (dist < thr * norm.double()[:, None]) & valid
    return hit.sum(1).double(), valid.sum(1).double()


def pck(pred, gt, weight, norm, thr: float = THRESHOLD) -> torch.Tensor:
    """Per-sample PCK [N] (NaN where a sample has no weighted joint)."""
    hit, n = pck_hits(pred, gt, weight, norm, thr)
    return torch.where(n > 0, hit / n.clamp_min(1), torch.full_like(hit, float("nan")))


def view_box_side(boxes: torch.Tensor, crops: torch.Tensor, params: torch.Tensor,
                  meta: dict) -> torch.Tensor:
    """max(box w, h) in a view's input pixels [N]."""
    ws = meta["store_size"][1]
    w_in = meta["input_size"][1]
    view_scale = (w_in / (ws / float(meta["context"]))) / torch.as_tensor(params)[:, 0].double()
    side = torch.as_tensor(boxes)[:, 2:].double().max(1).values
    return side * torch.as_tensor(crops)[:, 2].double() * view_scale


def input_to_original(xy: torch.Tensor, crops: torch.Tensor, meta: dict) -> torch.Tensor:
    """Un-augmented view's input pixels [N, K, 2] -> original image pixels."""
    h, w = meta["input_size"]
    hs, ws = meta["store_size"]
    s_view = w / (ws / float(meta["context"]))
    crops = torch.as_tensor(crops, dtype=torch.float64)
    c_in = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=torch.float64)
    return (xy.double() - c_in) / (s_view * crops[:, None, 2:3]) + crops[:, None, :2]


def stored_to_original(kps: torch.Tensor, crops: torch.Tensor, meta: dict) -> torch.Tensor:
    """Stored-crop keypoints [N, K, 3] -> original pixels (x, y) [N, K, 2]."""
    hs, ws = meta["store_size"]
    crops = torch.as_tensor(crops, dtype=torch.float64)
    c_s = torch.tensor([(ws - 1) / 2.0, (hs - 1) / 2.0], dtype=torch.float64)
    return (torch.as_tensor(kps)[..., :2].double() - c_s) / crops[:, None, 2:3] \
        + crops[:, None, :2]


def coco_ap(pred_orig: np.ndarray, scores: np.ndarray, gt_kps_orig: np.ndarray,
            visibility: np.ndarray, boxes: np.ndarray, areas: np.ndarray,
            image_ids: np.ndarray, sigmas: Sequence[float]) -> dict[str, float]:
    """COCO keypoint AP / AP50 / AP75 / AR by pycocotools: person n's ground truth
    (keypoints [N, K, 2] + visibility [N, K], box, area) against detection n."""
    from pycocotools.coco import COCO  # noqa: PLC0415 - optional heavy dependency (pycocotools)
    from pycocotools.cocoeval import COCOeval  # noqa: PLC0415 - optional heavy dependency (pycocotools)

    n, k = visibility.shape
    anns, dets = [], []
    for i in range(n):
        v = visibility[i]
        kp = np.concatenate([np.where(v[:, None] > 0, gt_kps_orig[i], 0.0), v[:, None]], 1)
        anns.append({"id": i + 1, "image_id": int(image_ids[i]), "category_id": 1,
                     "iscrowd": 0, "area": float(areas[i]), "bbox": [float(b) for b in boxes[i]],
                     "keypoints": [float(t) for t in kp.reshape(-1)],
                     "num_keypoints": int((v > 0).sum())})
        dk = np.concatenate([pred_orig[i], np.ones((k, 1))], 1)
        dets.append({"image_id": int(image_ids[i]), "category_id": 1,
                     "keypoints": [float(t) for t in dk.reshape(-1)], "score": float(scores[i])})
    gt = COCO()
    gt.dataset = {"images": [{"id": int(i)} for i in sorted(set(image_ids.tolist()))],
                  "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    st = ev.stats
    return {"AP": float(st[0]), "AP50": float(st[1]), "AP75": float(st[2]),
            "AR": float(st[5])}


RANK_THRESHOLD = 0.05


def rank_key(rows: torch.Tensor, layout, input_size: Sequence[int], view_kps: torch.Tensor,
             weight: torch.Tensor, thr: float = RANK_THRESHOLD) -> torch.Tensor:
    """A model's per-sample ranking key [N] on a view: PCK@0.05 with distances in units of
    the input size (x / W, y / H), the accuracy mmpose's SimCC and heatmap heads report
    while training; NaN where the sample has no weighted joint. (PCK@0.2 of the box is
    near its ceiling for every trained model and would hardly rank them.)"""
    h, w = (int(v) for v in input_size)
    xy, _ = decode(rows, layout, input_size)
    size = torch.tensor([w, h], dtype=torch.float64, device=xy.device)
    return pck(xy / size, view_kps[..., :2].to(xy.device).double() / size,
               weight.to(xy.device), torch.ones(len(xy), dtype=torch.float64,
                                                device=xy.device), thr)

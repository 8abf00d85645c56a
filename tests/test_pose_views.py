"""Keyed top-down views against an independent affine reference (OpenCV's rotation matrix
and warp), with the flip swapping left and right joints."""

import cv2
import numpy as np
import torch

from ckd.pose.coco import flip_permutation
from ckd.pose.synthetic import JOINTS
from ckd.pose.views import (
    IDENTITY_SLOT,
    ROTATION,
    SCALE,
    transform_keypoints,
    view_matrices,
    view_params,
    warp_images,
)

STORE, INPUT, CONTEXT = (48, 36), (32, 24), 1.5


def test_params_are_keyed_and_in_range():
    idx = torch.arange(4000)
    p = view_params(7, idx, 3)
    assert torch.equal(p, view_params(7, idx, 3))
    assert torch.equal(p[[5, 900]], view_params(7, torch.tensor([5, 900]), 3))  # per sample
    assert not torch.equal(p, view_params(7, idx, 4))
    assert not torch.equal(p, view_params(8, idx, 3))
    assert ((p[:, 0] >= SCALE[0]) & (p[:, 0] <= SCALE[1])).all()
    assert (p[:, 1].abs() <= ROTATION).all()
    assert abs(float(p[:, 2].mean()) - 0.5) < 0.03
    assert abs(float((p[:, 1] == 0).double().mean()) - 0.4) < 0.03
    ident = view_params(7, idx[:3], IDENTITY_SLOT)
    assert ident.tolist() == [[1.0, 0.0, 0.0]] * 3


def _reference(params, img, kps, perm):
    """The view by OpenCV: rotation matrix about the crop centre, moved to the input centre,
    warped, then mirrored with cv2.flip and the joints permuted."""
    scale, rot, flip = (float(v) for v in params)
    hs, ws = STORE
    h, w = INPUT
    s = (w * CONTEXT / ws) / scale
    m = cv2.getRotationMatrix2D(((ws - 1) / 2, (hs - 1) / 2), rot, s)
    m[:, 2] += np.array([(w - 1) / 2, (h - 1) / 2]) - np.array([(ws - 1) / 2, (hs - 1) / 2])
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    xy = kps[:, :2] @ m[:, :2].T + m[:, 2]
    if flip:
        out = cv2.flip(out, 1)
        xy[:, 0] = (w - 1) - xy[:, 0]
        xy, vis = xy[perm], kps[perm, 2]
    else:
        vis = kps[:, 2]
    return out, np.concatenate([xy, vis[:, None]], 1)


def test_views_match_opencv_reference():
    rng = np.random.default_rng(0)
    k = len(JOINTS)
    perm = flip_permutation(list(JOINTS))
    base = rng.integers(0, 256, size=(12, 9, 3)).astype(np.uint8)  # smooth-ish content
    imgs = np.stack([cv2.resize(np.roll(base, i, 0), (STORE[1], STORE[0]),
                                interpolation=cv2.INTER_LINEAR) for i in range(16)])
    kps = np.concatenate([rng.uniform(0, 36, (16, k, 1)), rng.uniform(0, 48, (16, k, 1)),
                          np.full((16, k, 1), 2.0)], 2)
    params = view_params(11, torch.arange(16), 0)
    params[0] = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # a pure flip
    params[1] = torch.tensor([1.2, 25.0, 1.0], dtype=torch.float64)
    assert params[:, 2].sum() >= 3 and (params[:, 2] == 0).sum() >= 3
    mats = view_matrices(params, STORE, INPUT, CONTEXT)
    got = warp_images(torch.from_numpy(imgs), mats, INPUT).permute(0, 2, 3, 1).numpy()
    got_kp = transform_keypoints(torch.from_numpy(kps), mats, params[:, 2], perm).numpy()
    for i in range(16):
        ref_img, ref_kp = _reference(params[i], imgs[i], kps[i], perm)
        assert np.allclose(got_kp[i], ref_kp, atol=1e-9)
        diff = np.abs(got[i] - ref_img.astype(np.float64))
        # OpenCV quantizes bilinear weights to 1/32 and rounds to uint8
        assert diff.mean() < 0.6 and diff.max() <= 8, (i, diff.mean(), diff.max())


def test_flip_swaps_joints_and_mirrors():
    k = len(JOINTS)
    perm = flip_permutation(list(JOINTS))
    kps = torch.cat([torch.rand(1, k, 2) * 30, torch.full((1, k, 1), 2.0)], 2).double()
    kps[0, 4] = 0.0  # right_elbow unlabelled
    plain = torch.tensor([[0.9, 10.0, 0.0]], dtype=torch.float64)
    flipped = torch.tensor([[0.9, 10.0, 1.0]], dtype=torch.float64)
    a = transform_keypoints(kps, view_matrices(plain, STORE, INPUT, CONTEXT), plain[:, 2], perm)
    b = transform_keypoints(kps, view_matrices(flipped, STORE, INPUT, CONTEXT),
                            flipped[:, 2], perm)
    li, ri = JOINTS.index("left_wrist"), JOINTS.index("right_wrist")
    assert torch.allclose(b[0, li, 0], INPUT[1] - 1 - a[0, ri, 0])
    assert torch.allclose(b[0, li, 1], a[0, ri, 1])
    le = JOINTS.index("left_elbow")
    assert b[0, le].tolist() == [0.0, 0.0, 0.0]  # the unlabelled right elbow, now "left"
    assert torch.equal(b[0, 0, 2], a[0, 0, 2])  # the nose stays the nose
    img = torch.randint(0, 256, (1, *STORE, 3), dtype=torch.uint8)
    x_plain = warp_images(img, view_matrices(plain, STORE, INPUT, CONTEXT), INPUT)
    x_flip = warp_images(img, view_matrices(flipped, STORE, INPUT, CONTEXT), INPUT)
    assert torch.allclose(x_flip, x_plain.flip(3), atol=1e-3)

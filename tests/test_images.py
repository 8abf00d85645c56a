"""The replaying FFCV decoder on real JPEGs of varied sizes: the crop is the view's box
(vs OpenCV and PIL references), every resolution sees the same box, and pixels do not
depend on batch composition or visiting order."""

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ckd.data.images import ImageLoader
from ckd.data.rrc import rrc_views

SIZES = (24, 40)


@pytest.fixture(scope="module")
def loader(prepared_images):
    return ImageLoader(prepared_images / "train.beton", SIZES, batch_size=5)


def _views(loader, seed: int, slot: int) -> torch.Tensor:
    hw = torch.from_numpy(loader.beton.orig_hw)
    return rrc_views(seed, torch.arange(len(loader.beton)), slot, hw[:, 0], hw[:, 1])


def _collect(loader, order) -> dict[int, list[np.ndarray]]:
    out = {}
    for imgs, labels, idx in loader.iterate(order):
        assert torch.equal(labels, torch.from_numpy(loader.beton.labels[idx.numpy()]))
        for b, i in enumerate(idx.tolist()):
            out[i] = [im[b].numpy() for im in imgs]
    return out


def test_crops_match_references(loader):
    n = len(loader.beton)
    views = _views(loader, 0, 2)
    loader.set_boxes(torch.arange(n), views)
    got = _collect(loader, np.arange(n))
    assert sorted(got) == list(range(n))
    assert views[:, 4].min() == 0 and views[:, 4].max() == 1  # both flips present
    for i in range(n):
        stored = np.asarray(Image.open(io.BytesIO(loader.beton.jpeg_bytes(i))).convert("RGB"))
        y0, x0, y1, x1, flip = loader.table[i].tolist()
        crop = stored[y0:y1, x0:x1]
        for s, img in zip(SIZES, got[i], strict=True):
            assert img.shape == (s, s, 3) and img.dtype == np.uint8
            ref_cv = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA)
            ref_pil = np.asarray(Image.fromarray(crop).resize((s, s), Image.BILINEAR))
            if flip:
                ref_cv, ref_pil = ref_cv[:, ::-1], ref_pil[:, ::-1]
            err_cv = np.abs(img.astype(int) - ref_cv).mean()
            err_pil = np.abs(img.astype(int) - ref_pil).mean()
            # OpenCV's INTER_AREA is the decoder's resize: only JPEG decoding differs.
            assert err_cv < 2.0, (i, s, err_cv)
            assert err_pil < 15.0, (i, s, err_pil)
            # ... and the wrong crop (the other flip) is clearly worse for photos.
            if loader.beton.labels[i] < 2 and s == SIZES[1]:
                assert np.abs(img.astype(int) - ref_cv[:, ::-1]).mean() > 2 * err_cv + 1


def test_pixels_do_not_depend_on_batching_or_order(loader):
    n = len(loader.beton)
    loader.set_boxes(torch.arange(n), _views(loader, 3, 0))
    forward = _collect(loader, np.arange(n))
    perm = np.random.default_rng(0).permutation(n)[: n - 3]  # other batches, a subset
    shuffled = _collect(loader, perm)
    assert sorted(shuffled) == sorted(perm.tolist())
    for i in perm.tolist():
        for a, b in zip(forward[i], shuffled[i], strict=True):
            assert np.array_equal(a, b)
    # Changing the boxes changes the pixels without rebuilding the loader.
    loader.set_boxes(torch.arange(n), _views(loader, 3, 1))
    other = _collect(loader, np.arange(n))
    assert sum(not np.array_equal(forward[i][1], other[i][1]) for i in range(n)) >= n - 1


def test_center_crop_evaluation(prepared_images):
    ev = ImageLoader(prepared_images / "test.beton", [32], batch_size=4, center_crop=True)
    got = _collect(ev, np.arange(len(ev.beton)))
    assert len(got) == 6 and all(v[0].shape == (32, 32, 3) for v in got.values())
    assert _collect(ev, np.arange(len(ev.beton)))[3][0].tobytes() == got[3][0].tobytes()


def test_image_loader_keeps_torch_thread_count(prepared_images):
    """ffcv sets torch's thread count when imported and when a Loader is made; the image
    loader must leave the caller's count alone (a second thread on a busy 2-core machine
    made steps 10-25x slower)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # ffcv would set its worker count (2 here)
        ev = ImageLoader(prepared_images / "test.beton", [32], batch_size=4, center_crop=True)
        assert torch.get_num_threads() == 1
        _collect(ev, np.arange(len(ev.beton)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

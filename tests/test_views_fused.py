"""The one-kernel CIFAR views (ckd.data.views_triton, used by ckd.data.views on CUDA) equal
the torch implementation bit for bit: view ids from (seed, index), crops, flips, zero
padding, normalization, NCHW and channels_last, given ids and the identity view."""

from __future__ import annotations

import pytest
import torch
from device import DEVICE

from ckd.data import views as V
from ckd.data.views_triton import view_ids_fused, views_fused
from ckd.hashing import hash32, seed_keys

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)


def _torch_views(images, ids, channels_last):
    """The torch implementation (on CPU: what apply_views runs there)."""
    out = V.normalize(V.crop_flip_u8(images.cpu(), ids.cpu()), MEAN, STD).permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
@pytest.mark.parametrize("shape", [(6, 32, 32), (3, 8, 10)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_views_equal_torch_bit_for_bit(seed, shape, channels_last):
    b, h, w = shape
    images = _images(b, h, w, seed % 97)
    indices = torch.tensor([0, 5, 2**33 + 1, 49999, 12, 3][:b])
    scale, shift = V._affine(MEAN, STD, DEVICE)
    x, ids = views_fused(images.to(DEVICE), scale, shift, keys=seed_keys(seed),
                         indices=indices.to(DEVICE), channels_last=channels_last)
    expect_ids = (hash32(seed, indices) * V.NUM_VIEWS) >> 32
    assert torch.equal(ids.cpu(), expect_ids)
    expect = _torch_views(images, expect_ids, channels_last)
    assert torch.equal(x.cpu(), expect)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    assert torch.equal(view_ids_fused(seed_keys(seed), indices.to(DEVICE)).cpu(), expect_ids)


def test_fused_views_given_ids_every_view_and_identity():
    images = _images(V.NUM_VIEWS + 1, 32, 32, 1)
    ids = torch.cat([torch.arange(V.NUM_VIEWS), torch.tensor([V.IDENTITY_VIEW])])
    scale, shift = V._affine(MEAN, STD, DEVICE)
    x, out_ids = views_fused(images.to(DEVICE), scale, shift, ids=ids.to(DEVICE))
    assert torch.equal(x.cpu(), _torch_views(images, ids, False))
    assert torch.equal(out_ids.cpu(), ids)
    x, out_ids = views_fused(images[:4].to(DEVICE), scale, shift, identity=True)
    assert torch.equal(x.cpu(), _torch_views(images[:4], torch.full((4,), -1), False))
    assert torch.equal(out_ids.cpu(), torch.full((4,), -1))

"""Keyed augmentation views: recipe equality with a per-sample reference, uniformity,
determinism, CPU/CUDA agreement."""

import pytest
import torch
import torch.nn.functional as F

from ckd.data.datasets import CIFAR100_MEAN, CIFAR100_STD
from ckd.data.views import (
    IDENTITY_VIEW,
    NUM_VIEWS,
    RECIPE,
    apply_views,
    crop_flip_u8,
    decode_views,
    encode_views,
    view_ids,
)

try:  # the 0.999 quantile of chi-square with 161 dof
    from scipy.stats import chi2

    CHI2_161_999 = float(chi2.ppf(0.999, NUM_VIEWS - 1))
except ImportError:  # value of scipy.stats.chi2.ppf(0.999, 161), computed once
    CHI2_161_999 = 222.19


def _images(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)


def _reference_u8(images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding=4) + hflip at fixed offsets, one sample at a time:
    zero-pad the uint8 CHW image, crop at (dy, dx), then flip the width axis."""
    out = []
    for img, i in zip(images, ids.tolist(), strict=True):
        if i == IDENTITY_VIEW:
            dy, dx, flip = 4, 4, 0
        else:
            dy, dx, flip = i // 18, (i // 2) % 9, i % 2
        h, w = img.shape[:2]
        chw = F.pad(img.permute(2, 0, 1), (4, 4, 4, 4))  # constant zeros
        crop = chw[:, dy:dy + h, dx:dx + w]
        if flip:
            crop = crop.flip(-1)
        out.append(crop.permute(1, 2, 0))
    return torch.stack(out)


def test_recipe_constants():
    assert NUM_VIEWS == 9 * 9 * 2 and IDENTITY_VIEW == -1
    assert RECIPE == {"name": "cifar-pad4-crop32-flip", "version": 1}


def test_views_equal_reference_for_every_view():
    ids = torch.cat([torch.arange(NUM_VIEWS), torch.arange(NUM_VIEWS).flip(0),
                     torch.tensor([IDENTITY_VIEW])])
    images = _images(ids.numel())
    ref = _reference_u8(images, ids)
    assert torch.equal(crop_flip_u8(images, ids), ref)
    mean, std = torch.tensor(CIFAR100_MEAN), torch.tensor(CIFAR100_STD)
    expected = ((ref.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)
    out = apply_views(images, ids, CIFAR100_MEAN, CIFAR100_STD)
    assert out.dtype == torch.float32 and out.shape == (ids.numel(), 3, 32, 32)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_views_match_torchvision_if_available():
    tvf = pytest.importorskip("torchvision.transforms.functional",
                              reason="torchvision not importable here")
    ids = torch.arange(NUM_VIEWS)
    images = _images(NUM_VIEWS, seed=1)
    ours = crop_flip_u8(images, ids)
    for img, i, got in zip(images, ids.tolist(), ours, strict=True):
        dy, dx, flip = i // 18, (i // 2) % 9, i % 2
        x = tvf.crop(tvf.pad(img.permute(2, 0, 1), [4]), dy, dx, 32, 32)
        x = tvf.hflip(x) if flip else x
        assert torch.equal(x.permute(1, 2, 0), got)


def test_views_on_other_sizes_and_padding_is_zero():
    images = torch.full((2, 8, 8, 3), 200, dtype=torch.uint8)
    ids = encode_views(torch.tensor([0, 8]), torch.tensor([0, 8]), torch.tensor([1, 0]))
    out = crop_flip_u8(images, ids)
    assert torch.equal(out, _reference_u8(images, ids))
    # Offset (0, 0): the top 4 rows/left 4 columns come from the zero padding; flipped,
    # the zero columns end up on the right.
    assert (out[0, :4] == 0).all() and (out[0, :, 4:] == 0).all() and (out[0, 4:, :4] == 200).all()
    assert (out[1, 4:] == 0).all() and (out[1, :4, :4] == 200).all()


def test_identity_view_is_raw_image():
    images = _images(5, seed=2)
    ids = torch.full((5,), IDENTITY_VIEW)
    assert torch.equal(crop_flip_u8(images, ids), images)
    out = apply_views(images, ids, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    expected = ((images.float() / 255.0 - 0.5) / 0.25).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (view_ids(-1, torch.arange(10)) == IDENTITY_VIEW).all()


def test_channels_last_same_values():
    images, ids = _images(4, seed=3), torch.tensor([0, 17, 100, 161])
    a = apply_views(images, ids, CIFAR100_MEAN, CIFAR100_STD)
    b = apply_views(images, ids, CIFAR100_MEAN, CIFAR100_STD, channels_last=True)
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


def test_decode_encode_roundtrip_and_errors():
    ids = torch.arange(NUM_VIEWS)
    dy, dx, flip = decode_views(ids)
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    assert set(flip.tolist()) == {0, 1}
    assert torch.equal(encode_views(dy, dx, flip), ids)
    assert [t.item() for t in decode_views(torch.tensor([IDENTITY_VIEW]))] == [4, 4, 0]
    with pytest.raises(ValueError, match="view ids"):
        decode_views(torch.tensor([162]))
    with pytest.raises(ValueError, match="one view id per image"):
        crop_flip_u8(_images(2), torch.tensor([0]))


def _python_view_id(seed: int, index: int) -> int:
    """Plain Python-int lowbias32 reference: no fixed-width arithmetic to overflow."""
    m = 0xFFFFFFFF

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    k1 = mix((seed & m) ^ mix(((seed >> 32) & m) ^ 0x9E3779B9))
    k2 = mix(k1 ^ 0x85EBCA6B)
    h = mix(mix((index & m) ^ k1) ^ ((index >> 32) & m) ^ k2)
    return (h * NUM_VIEWS) >> 32


def test_hash_matches_unbounded_integer_reference():
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.arange(50), torch.randint(0, 2**62, (200,), generator=g),
                     torch.tensor([2**32 - 1, 2**32, 2**63 - 1])])
    for seed in (0, 1, 2**40 + 3, -7):
        got = view_ids(seed, idx).tolist()
        assert got == [_python_view_id(seed, i) for i in idx.tolist()]


def test_view_ids_pinned_values():
    # Cached logits are keyed by these ids: changing the hash invalidates every cache.
    assert view_ids(0, torch.arange(12)).tolist() == [19, 41, 17, 128, 7, 95, 26, 94, 114,
                                                      18, 153, 99]
    assert view_ids(2024, torch.tensor([0, 1, 49999, 2**40 + 7])).tolist() == [18, 79, 145, 47]


@pytest.mark.parametrize("seed", [0, 12345])
def test_view_ids_uniform_chi_square(seed):
    n_per = 200
    for idx in (torch.arange(NUM_VIEWS * n_per),  # consecutive indices
                torch.randint(0, 2**40, (NUM_VIEWS * n_per,),
                              generator=torch.Generator().manual_seed(seed))):
        ids = view_ids(seed, idx)
        assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < NUM_VIEWS
        counts = torch.bincount(ids, minlength=NUM_VIEWS).double()
        stat = float(((counts - n_per) ** 2 / n_per).sum())
        assert stat < CHI2_161_999, stat


def test_view_ids_deterministic_and_seed_dependent():
    idx = torch.arange(5000)
    a, b = view_ids(7, idx), view_ids(7, idx.clone())
    assert torch.equal(a, b)
    assert torch.equal(view_ids(7, idx[1234:1240]), a[1234:1240])  # per-index, not per-batch
    agree = (view_ids(8, idx) == a).double().mean().item()
    assert agree < 0.02  # independent seeds agree ~1/162 of the time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    idx = torch.cat([torch.arange(10000), torch.tensor([2**40 + 5, 2**63 - 1])])
    for seed in (0, 99, 2**33 + 1):
        assert torch.equal(view_ids(seed, idx.cuda()).cpu(), view_ids(seed, idx))
    images = _images(64, seed=4)
    ids = view_ids(3, torch.arange(64))
    cpu = apply_views(images, ids, CIFAR100_MEAN, CIFAR100_STD)
    gpu = apply_views(images.cuda(), ids.cuda(), CIFAR100_MEAN, CIFAR100_STD)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)

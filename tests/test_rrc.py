"""Random-resized-crop views as a pure function: equal to torchvision's get_params fed the
same draws, uniform draws, the slot rule, and the original -> stored box mapping."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from ckd.data.rrc import (
    ATTEMPTS,
    FLIP_DRAW,
    RATIO,
    SCALE,
    draws,
    epoch_slots,
    rrc_view,
    rrc_views,
    stored_box,
)


class _Draws:
    """Replays one sample's 32-bit draws in the order the reference consumes them."""

    def __init__(self, h32: list[int]) -> None:
        self.h32 = h32

    def uniform(self, d: int, lo: float, hi: float) -> float:
        return lo + (self.h32[d] / 2**32) * (hi - lo)

    def randint(self, d: int, n: int) -> int:  # uniform in [0, n)
        return (self.h32[d] * n) >> 32


def torchvision_get_params(height: int, width: int, rnd: _Draws) -> tuple[tuple, bool]:
    """RandomResizedCrop.get_params as torchvision documents and implements it
    (scale (0.08, 1), ratio (3/4, 4/3)), one sample at a time with Python floats; draw 4t..4t+3
    of attempt t replace its torch.empty().uniform_() / torch.randint() calls. Returns
    ((i, j, h, w), whether the center-crop fallback was used)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for t in range(10):
        target_area = area * rnd.uniform(4 * t, SCALE[0], SCALE[1])
        aspect_ratio = math.exp(rnd.uniform(4 * t + 1, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rnd.randint(4 * t + 2, height - h + 1)
            j = rnd.randint(4 * t + 3, width - w + 1)
            return (i, j, h, w), False
    # Fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(RATIO):
        w = width
        h = int(round(w / min(RATIO)))
    elif in_ratio > max(RATIO):
        h = height
        w = int(round(h * max(RATIO)))
    else:  # whole image
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return (i, j, h, w), True


SIZES = [(427, 640), (640, 427), (32, 32), (1, 1), (2, 3), (7, 500), (500, 7), (13, 17),
         (375, 500), (4000, 3000), (224, 224), (3, 1)]


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_boxes_equal_torchvision_reference(seed):
    rng = np.random.default_rng(seed % 1000)
    n = 400
    idx = torch.from_numpy(rng.integers(0, 2_000_000, n))
    hw = torch.tensor([SIZES[i % len(SIZES)] for i in range(n)])
    fallbacks = 0
    for slot in (0, 3):
        got = rrc_views(seed, idx, slot, hw[:, 0], hw[:, 1])
        h32 = draws(seed, idx, slot)
        for b in range(n):
            ref, fell_back = torchvision_get_params(int(hw[b, 0]), int(hw[b, 1]),
                                                    _Draws(h32[b].tolist()))
            assert tuple(got[b, :4].tolist()) == ref, (b, tuple(hw[b].tolist()))
            assert int(got[b, 4]) == int(h32[b, FLIP_DRAW]) >> 31
            top, left, h, w = ref
            assert 0 <= top and top + h <= hw[b, 0] and 0 <= left and left + w <= hw[b, 1]
            fallbacks += fell_back
    assert fallbacks > 0  # extreme aspect ratios reach the center-crop fallback
    assert rrc_view(seed, int(idx[5]), 3, *SIZES[5]) == tuple(
        rrc_views(seed, idx[5:6], 3, hw[5:6, 0], hw[5:6, 1])[0].tolist())


def test_views_are_pure_and_keyed():
    idx = torch.arange(1000)
    h, w = torch.full((1000,), 375), torch.full((1000,), 500)
    a = rrc_views(1, idx, 2, h, w)
    assert torch.equal(a, rrc_views(1, idx, 2, h, w))
    assert torch.equal(a[500:], rrc_views(1, idx[500:], 2, h[500:], w[500:]))  # per sample
    assert (a != rrc_views(1, idx, 3, h, w)).any(1).float().mean() > 0.99  # other slot
    assert (a != rrc_views(2, idx, 2, h, w)).any(1).float().mean() > 0.99  # other seed


def _chi_square_p(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values, minlength=bins)
    expected = len(values) / bins
    return float(chi2.sf(((counts - expected) ** 2 / expected).sum(), bins - 1))


def test_drawn_parameters_are_uniform():
    n, bins = 40_000, 20
    idx = torch.arange(n)
    h32 = draws(5, idx, 1).numpy()
    for d in (0, 1, 2, 3, 4 * (ATTEMPTS - 1), FLIP_DRAW):  # scale, ratio, top, left, ..., flip
        assert _chi_square_p((h32[:, d] * bins) >> 32, bins) > 1e-3, d
    # On a large square image the first attempt nearly always succeeds: its area fraction
    # is uniform on (0.08, 1) and its log aspect ratio uniform on (log 3/4, log 4/3).
    size = torch.full((n,), 4096)
    box = rrc_views(5, idx, 1, size, size).numpy().astype(np.float64)
    frac = box[:, 2] * box[:, 3] / 4096**2
    first = (frac > 0.1) & (frac < 0.45)  # below 0.75 no aspect ratio is rejected
    u = (frac[first] - 0.1) / 0.35
    assert _chi_square_p(np.minimum((u * bins).astype(int), bins - 1), bins) > 1e-3
    logr = np.log(box[first, 3] / box[first, 2])  # areas never rejected at any ratio
    lo, hi = np.log(RATIO[0]), np.log(RATIO[1])
    v = (logr - lo) / (hi - lo)
    assert _chi_square_p(np.minimum((v * bins).astype(int), bins - 1), bins) > 1e-3
    assert abs(box[:, 4].mean() - 0.5) < 0.02


def test_epoch_slots_rule():
    idx = torch.arange(30_000)
    s = epoch_slots(3, 4, idx, 10)
    assert s.min() >= 0 and s.max() < 10
    assert _chi_square_p(s.numpy(), 10) > 1e-3
    assert torch.equal(s[::7], epoch_slots(3, 4, idx[::7], 10))  # no batch/world dependence
    assert (s != epoch_slots(3, 5, idx, 10)).float().mean() > 0.85  # epochs differ
    assert torch.equal(epoch_slots(3, 4, idx, 1), torch.zeros_like(idx))
    with pytest.raises(ValueError, match="num_slots"):
        epoch_slots(3, 4, idx, 0)



def test_without_a_cache_epoch_e_shows_slot_e():
    """Online mentors and mentors trained from scratch see a fresh keyed crop per epoch:
    the recipe names the view of (epoch e, sample i) by its slot e of the draws."""
    from ckd.data.rrc import RandomResizedCrops

    idx = torch.tensor([0, 5, 9])
    for e in (0, 3):
        assert torch.equal(RandomResizedCrops().epoch_view_ids(7, e, idx),
                           torch.full((3,), e, dtype=torch.int64))


def test_stored_box_scales_exactly():
    boxes = torch.tensor([[0, 0, 427, 640, 1], [10, 20, 100, 50, 0], [426, 639, 1, 1, 0]])
    orig = torch.tensor([[427, 640]] * 3)
    assert torch.equal(stored_box(boxes, orig, orig)[:, :4],
                       torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2],
                                    boxes[:, 1] + boxes[:, 3]], 1))
    half = stored_box(boxes, orig, torch.tensor([[213, 320]] * 3))
    assert half.tolist() == [[0, 0, 213, 320, 1], [4, 10, 55, 35, 0], [212, 319, 213, 320, 0]]

"""Keyed augmentation views: the CIFAR recipe (zero-pad 4, random 32x32 crop, horizontal
flip) as a pure function of (augmentation seed, sample index).

A view id in 0..161 enumerates the 9 x 9 crop offsets x 2 flips:
`id = (dy * 9 + dx) * 2 + flip`, with (dy, dx) the crop's top-left corner in the
zero-padded (H+8) x (W+8) image. `IDENTITY_VIEW` (-1) is the un-augmented image
(offset (4, 4), no flip); seed -1 maps every sample to it (evaluation).

`view_ids` uses a counter-based 32-bit hash written with int64 torch ops whose
intermediates all stay below 2^50, so CPU and CUDA give bit-identical ids with no global
RNG involved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ckd.hashing import epoch_seed, hash32, seed_keys

NUM_VIEWS = 162
IDENTITY_VIEW = -1
IDENTITY_SEED = -1
RECIPE = {"name": "cifar-pad4-crop32-flip", "version": 1}
PAD = 4
_OFFSETS = 2 * PAD + 1  # 9 crop offsets per axis

def view_ids(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """View id in 0..161 for each sample index (int64, same device as `indices`).

    Uniform over the 162 views (multiply-shift reduction of a 32-bit hash, bias < 2^-24);
    `seed == -1` gives `IDENTITY_VIEW` for every sample."""
    indices = torch.as_tensor(indices)
    if int(seed) == IDENTITY_SEED:
        return torch.full(indices.shape, IDENTITY_VIEW, dtype=torch.int64, device=indices.device)
    if indices.is_cuda and indices.ndim == 1:  # one kernel instead of ~20 integer ops
        from ckd.data.views_triton import view_ids_fused  # noqa: PLC0415 - needs triton

        return view_ids_fused(seed_keys(int(seed)), indices, NUM_VIEWS)
    return (hash32(seed, indices) * NUM_VIEWS) >> 32


def decode_views(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids -> (dy, dx, flip) int64 tensors; `IDENTITY_VIEW` -> (4, 4, 0).

    Out-of-range ids raise on CPU; on CUDA the check is skipped (it would sync the host
    every batch)."""
    ids = torch.as_tensor(ids).to(torch.int64)
    bad = (ids < IDENTITY_VIEW) | (ids >= NUM_VIEWS)
    if ids.device.type == "cpu" and bool(bad.any()):
        raise ValueError(f"view ids must be in -1..{NUM_VIEWS - 1}, got "
                         f"{ids[bad].flatten()[:5].tolist()}")
    ident = ids == IDENTITY_VIEW
    safe = torch.where(ident, torch.zeros_like(ids), ids)
    flip = torch.where(ident, torch.zeros_like(ids), safe % 2)
    dx = torch.where(ident, torch.full_like(ids, PAD), (safe // 2) % _OFFSETS)
    dy = torch.where(ident, torch.full_like(ids, PAD), safe // (2 * _OFFSETS))
    return dy, dx, flip


def encode_views(dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Inverse of `decode_views` for ordinary views."""
    return (dy * _OFFSETS + dx) * 2 + flip


_AFFINE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(mean: Sequence[float], std: Sequence[float], device: torch.device,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) float32 on `device`, cached: a fresh host->GPU copy every batch would
    synchronize the host with the GPU."""
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), str(device))
    if key not in _AFFINE_CACHE:
        m64 = torch.tensor(key[0], dtype=torch.float64)
        s64 = torch.tensor(key[1], dtype=torch.float64)
        _AFFINE_CACHE[key] = ((1.0 / (255.0 * s64)).to(torch.float32).to(device),
                              (-m64 / s64).to(torch.float32).to(device))
    return _AFFINE_CACHE[key]


def normalize(x_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3] channels-last -> float32 (x/255 - mean)/std, computed as one fused
    multiply-add x * (1/(255 std)) + (-mean/std) (equal to the textbook order within
    1e-6; cache building and training both call this same function)."""
    scale, shift = _affine(mean, std, x_u8.device)
    return torch.addcmul(shift, x_u8.to(torch.float32), scale)


def crop_flip_u8(images_u8: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The geometric part of the views: uint8 [B,H,W,C] -> uint8 [B,H,W,C], as one gather
    from the zero-padded batch (pad first, like RandomCrop(padding=4) on uint8)."""
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
        raise ValueError(f"images must be uint8 [B,H,W,C], got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    b, h, w, c = images_u8.shape
    ids = torch.as_tensor(ids, device=images_u8.device)
    if ids.shape != (b,):
        raise ValueError(f"need one view id per image: ids {tuple(ids.shape)} vs B={b}")
    dy, dx, flip = decode_views(ids)
    padded = images_u8.new_zeros((b, h + 2 * PAD, w + 2 * PAD, c))
    padded[:, PAD:PAD + h, PAD:PAD + w] = images_u8
    ar_h = torch.arange(h, device=images_u8.device)
    ar_w = torch.arange(w, device=images_u8.device)
    rows = dy[:, None] + ar_h  # [B, H]
    # Crop then flip: out[y, x] = padded[y + dy, (W - 1 - x) + dx] when flipped.
    cols = dx[:, None] + torch.where(flip[:, None].bool(), (w - 1) - ar_w, ar_w)  # [B, W]
    bidx = torch.arange(b, device=images_u8.device)[:, None, None]
    return padded[bidx, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]


def apply_views(images_u8: torch.Tensor, ids: torch.Tensor, mean: Sequence[float],
                std: Sequence[float], *, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC [B,H,W,3] + view ids [B] -> normalized float32 NCHW [B,3,H,W].

    `channels_last=True` returns the same values in torch.channels_last memory format
    (no copy: the NHWC result permuted). On CUDA one kernel (ckd.data.views_triton) computes
    the same bits as the ~15 torch ops below."""
    if images_u8.is_cuda and images_u8.dtype == torch.uint8 and images_u8.ndim == 4 \
            and images_u8.is_contiguous():
        from ckd.data.views_triton import views_fused  # noqa: PLC0415 - needs triton

        ids = torch.as_tensor(ids, device=images_u8.device)
        if ids.shape != (images_u8.shape[0],):
            raise ValueError(f"need one view id per image: ids {tuple(ids.shape)} vs "
                             f"B={images_u8.shape[0]}")
        scale, shift = _affine(mean, std, images_u8.device)
        return views_fused(images_u8, scale, shift, ids=ids.to(torch.int64),
                           channels_last=channels_last, pad=PAD, num_views=NUM_VIEWS)[0]
    out = normalize(crop_flip_u8(images_u8, ids), mean, std).permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


class CifarViews:
    """The CIFAR recipe as a `ckd.data.protocol.ViewRecipe`: 162 discrete views; epoch e
    shows sample i view `view_ids(epoch_seed(seed, e), i)`, and a K-view cache (slot k
    holding the views of epoch k) replays slot e mod K."""

    record = RECIPE
    num_views = NUM_VIEWS

    def epoch_view_ids(self, seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        return view_ids(epoch_seed(seed, epoch), indices)

    def epoch_slots(self, seed: int, epoch: int, indices: torch.Tensor,
                    num_slots: int) -> torch.Tensor:
        return torch.full_like(torch.as_tensor(indices, dtype=torch.int64),
                               int(epoch) % int(num_slots))

    def student_input(self, images: torch.Tensor, view_ids: torch.Tensor,
                      mean: Sequence[float], std: Sequence[float], *,
                      channels_last: bool = False) -> torch.Tensor:
        return apply_views(images, view_ids, mean, std, channels_last=channels_last)


CIFAR_VIEWS = CifarViews()

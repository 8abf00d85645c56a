"""The CIFAR augmentation views in one Triton kernel (ckd.data.views uses it on CUDA).

`ckd.data.views` computes a batch's views as ~70 small torch ops (hash of the view ids,
decode, zero-pad, gather, normalize, permute). This kernel does the same in one launch,
bit for bit: one program per image computes its view id from (seed keys, sample index)
with the same 32-bit hash (or reads given ids), then writes every output pixel as
(padded image at the crop/flip offset, 0 outside) * scale[c] + shift[c] rounded once to
fp32, as torch.addcmul (an fma) does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ckd.hashing_triton import mix32_tl


@triton.jit(do_not_specialize=["k1", "k2"])
def _views_kernel(img_ptr, ids_ptr, idx_ptr, out_ptr, scale_ptr, shift_ptr, k1, k2, H, W,
                  FROM_IDS: tl.constexpr, IDENTITY: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                  IDS_ONLY: tl.constexpr, CH: tl.constexpr, PAD: tl.constexpr,
                  NUM_VIEWS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if IDENTITY:
        v = tl.full([], -1, tl.int64)
    elif FROM_IDS:
        v = tl.load(ids_ptr + b).to(tl.int64)
    else:
        idx = tl.load(idx_ptr + b).to(tl.int64)
        lo = (idx & 0xFFFFFFFF).to(tl.uint32)
        hi = ((idx >> 32) & 0xFFFFFFFF).to(tl.uint32)
        h = mix32_tl(lo ^ k1.to(tl.uint32))
        h = mix32_tl(h ^ hi ^ k2.to(tl.uint32))
        v = (h.to(tl.int64) * NUM_VIEWS) >> 32
    if not FROM_IDS:
        tl.store(ids_ptr + b, v)
    ident = v == -1
    safe = tl.where(ident, 0, v)
    flip = tl.where(ident, 0, safe % 2)
    dx = tl.where(ident, PAD, (safe // 2) % (2 * PAD + 1))
    dy = tl.where(ident, PAD, safe // (2 * (2 * PAD + 1)))
    n = H * W * CH
    for p0 in range(0, 0 if IDS_ONLY else n, BLOCK):
        p = p0 + tl.arange(0, BLOCK)  # output element in the kernel's layout
        m = p < n
        if CHANNELS_LAST:  # out is NHWC in memory
            c = p % CH
            x = (p // CH) % W
            y = p // (CH * W)
        else:  # NCHW
            x = p % W
            y = (p // W) % H
            c = p // (H * W)
        sx = tl.where(flip != 0, W - 1 - x, x) + dx - PAD
        sy = y + dy - PAD
        inside = m & (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)
        u8 = tl.load(img_ptr + b * n + (sy * W + sx) * CH + c, mask=inside, other=0)
        # one rounding of u * scale + shift (what torch.addcmul computes, an fma): the
        # product of an 8-bit integer and an fp32 and the sum are exact in fp64
        val = (u8.to(tl.float64) * tl.load(scale_ptr + c, mask=m, other=0.0).to(tl.float64)
               + tl.load(shift_ptr + c, mask=m, other=0.0).to(tl.float64)).to(tl.float32)
        tl.store(out_ptr + b * n + p, val, mask=m)


def view_ids_fused(keys: tuple[int, int], indices: torch.Tensor, num_views: int = 162
                   ) -> torch.Tensor:
    """View ids int64 [B] of sample `indices` (1-D) under the seed keys, in one launch."""
    b = indices.shape[0]
    ids = torch.empty(b, dtype=torch.int64, device=indices.device)
    if b:
        k1, k2 = (k - (1 << 32) if k >= 1 << 31 else k for k in keys)
        _views_kernel[(b,)](ids, ids, indices, ids, ids, ids, k1, k2, 0, 0, FROM_IDS=False,
                            IDENTITY=False, CHANNELS_LAST=False, IDS_ONLY=True, CH=1, PAD=4,
                            NUM_VIEWS=num_views, BLOCK=16, num_warps=1)
    return ids


def views_fused(images_u8: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *,
                ids: torch.Tensor | None = None, keys: tuple[int, int] | None = None,
                indices: torch.Tensor | None = None, identity: bool = False,
                channels_last: bool = False, pad: int = 4, num_views: int = 162):
    """(normalized float32 [B, C, H, W] (NCHW, or NHWC memory when channels_last), view
    ids int64 [B]) of contiguous uint8 NHWC images, in one launch. The ids are given, or
    computed from the seed keys and sample `indices`, or all identity."""
    b, h, w, ch = images_u8.shape
    dev = images_u8.device
    out = torch.empty((b, h, w, ch) if channels_last else (b, ch, h, w), device=dev,
                      dtype=torch.float32)
    from_ids = ids is not None
    out_ids = ids if from_ids else torch.empty(b, dtype=torch.int64, device=dev)
    k1, k2 = keys if keys is not None else (0, 0)
    to_i32 = [v - (1 << 32) if v >= 1 << 31 else v for v in (k1 & 0xFFFFFFFF, k2 & 0xFFFFFFFF)]
    _views_kernel[(b,)](images_u8, out_ids, indices if indices is not None else out_ids, out,
                        scale, shift, *to_i32, h, w, FROM_IDS=from_ids, IDENTITY=identity,
                        CHANNELS_LAST=channels_last, IDS_ONLY=False, CH=ch, PAD=pad,
                        NUM_VIEWS=num_views,
                        BLOCK=min(4096, triton.next_power_of_2(h * w * ch)), num_warps=4,
                        enable_fp_fusion=False)
    return (out.permute(0, 3, 1, 2) if channels_last else out), out_ids

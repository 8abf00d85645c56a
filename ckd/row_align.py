"""Logit rows laid out for 128-bit loads: each row of an [..., C] buffer starts on a
16-byte boundary (the last dimension is padded in memory and sliced off), so the loss
kernels read it 16 bytes at a time (a row of C = 100 fp16 logits is 200 bytes: padded to
208). One rule for the cache's buffers and gather output and the kernels' tests; torch
only, so the cache does not import the kernels."""

from __future__ import annotations

import numpy as np
import torch

ROW_ALIGN = 16  # bytes: one 128-bit load


def padded_width(num_classes: int, dtype: torch.dtype | np.dtype) -> int:
    """The row stride (elements) of an aligned buffer: C rounded up to 16 bytes."""
    per = max(1, ROW_ALIGN // dtype.itemsize)
    return -(-num_classes // per) * per


def aligned_rows(shape: tuple[int, ...], dtype: torch.dtype, device, *,
                 pin_memory: bool = False, zero_pad: bool = False) -> torch.Tensor:
    """An empty tensor of `shape` whose rows start at 16-byte boundaries: the view
    `[..., :C]` of a contiguous `[..., padded_width(C)]` buffer. `zero_pad` zeroes the pad
    columns (deterministic bytes; the kernels mask them)."""
    *lead, c = shape
    full = torch.empty(*lead, padded_width(c, dtype), dtype=dtype, device=device,
                       pin_memory=pin_memory)
    if zero_pad:
        full[..., c:] = 0
    return full[..., :c]

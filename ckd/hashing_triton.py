"""The Triton twin of `ckd.hashing.mix32`, for the kernels that draw ckd's counter-based
bits on the device (the loss kernels' noise and drops, the CIFAR views). Its own module
because it needs triton, which `ckd.hashing` (imported everywhere) must not."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix32_tl(x):
    """`ckd.hashing.mix32` on uint32 (wrapping multiplies): the Triton twin of ckd's hash."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)

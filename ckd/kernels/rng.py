"""Counter-based random numbers shared by the reference and the Triton kernels.

Every random draw in `ckd.kernels` is a pure function of integer keys, so the eager
reference and the fused kernel see exactly the same numbers without storing them:

- the mixer is ckd's one counter-based hash (`ckd.hashing.mix32`, lowbias32): the same
  bits come out of Python ints, torch int64 tensors and the Triton kernels.
- DGKD mentor drop: `dgkd_keep_mask(seed, step, M, p)` in plain Python (M values per step,
  no device work, no sync).
- TeKAP noise: `tekap_noise(seed, step, B, C, n_copies, dtype)`; the kernel computes the
  same integer hashes in-kernel, then Box-Muller in the loss's accumulation precision
  (fp32, or fp64 for a float64 student): bit-identical integers and uniforms (24-bit
  integers times 2^-24, exact in both), `log`/`cos` within an ulp of that precision
  between libraries (fp32 noise under a float64 loss would put ~1e-7 |eta| into it).
"""

from __future__ import annotations

import torch

from ckd.hashing import M32, mix32, mix32_int

STREAM_DGKD = 0x0D6A5EED
STREAM_TEKAP = 0x7E4A9015
TWO_PI = 6.283185307179586


def as_i32(v: int) -> int:
    """A 32-bit key as a signed i32 kernel argument: a fixed width, so Triton never
    respecializes on it (the kernels mask it back to [0, 2**32))."""
    v = int(v) & M32
    return v - (1 << 32) if v >= 1 << 31 else v


def stream_key(stream: int, seed: int, step: int) -> int:
    """Key of one (stream, seed, step): the per-step root every draw is derived from."""
    return mix32_int(mix32_int((seed & M32) ^ stream) ^ (step & M32))


def dgkd_keep_mask(seed: int, step: int, num_mentors: int, p: float) -> list[bool]:
    """Which mentors survive the random drop at this step (each dropped w.p. `p`).

    If every mentor is dropped the teacher (mentor 0) is kept, so every step still has a
    distillation signal [choice, documented in ckd/kernels/reference.py::dgkd].
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dgkd drop probability p must be in [0, 1], got {p}")
    threshold = int(p * 2.0**32)  # dropped iff hash < threshold: integer compare, exact
    root = stream_key(STREAM_DGKD, seed, step)
    keep = [mix32_int(root ^ m) >= threshold for m in range(num_mentors)]
    if num_mentors and not any(keep):
        keep[0] = True
    return keep


def tekap_noise(
    seed: int, step: int, B: int, C: int, n_copies: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise eta[copy, b, c] (in `dtype`: fp32, or fp64 for a float64
    loss) as the fused kernel draws it.

    key(b, i) = hash(hash(root ^ b) ^ i); u1 = ((hash(key ^ 2c) >> 8) + 1) / 2**24 in (0, 1],
    u2 = (hash(key ^ (2c + 1)) >> 8) / 2**24 in [0, 1); eta = sqrt(-2 ln u1) cos(2 pi u2).
    """
    root = stream_key(STREAM_TEKAP, seed, step)
    b = torch.arange(B, device=device, dtype=torch.int64).view(1, B, 1)
    i = torch.arange(n_copies, device=device, dtype=torch.int64).view(n_copies, 1, 1)
    c = torch.arange(C, device=device, dtype=torch.int64).view(1, 1, C)
    key = mix32(mix32(root ^ b) ^ i)
    h1 = mix32(key ^ (2 * c))
    h2 = mix32(key ^ (2 * c + 1))
    u1 = ((h1 >> 8) + 1).to(dtype) * (2.0**-24)
    u2 = (h2 >> 8).to(dtype) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(TWO_PI * u2)

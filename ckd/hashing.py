"""The one counter-based hash of ckd: every random draw (augmentation views, random-resized
crops, DGKD mentor drops, TeKAP noise, CRD negatives) is a pure function of integer keys
through this mixer, so eager code, torch tensors and the Triton kernels draw the same bits
without storing them.

`mix32` is lowbias32 (Chris Wellons' hash-prospector), a bijection on 32-bit integers. The
tensor version splits each constant into 16-bit halves so every product fits in int64;
the Triton twin (`ckd.hashing_triton.mix32_tl`) multiplies uint32 with wrap-around.

Two integer mixes sit beside it: `epoch_seed`, the seed of a view slot or epoch that every
view recipe and the cache share, and `splitmix64`, which turns (seed, epoch) into the
63-bit torch.Generator seed of an epoch's visiting order (`ckd.data.loaders`).
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
M63 = (1 << 63) - 1
MUL1, MUL2 = 0x7FEB352D, 0x846CA68B
SEED_MIX = 1_000_003  # epoch seed = seed * SEED_MIX + epoch (same mix online and cached)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """`mix32` on a Python int (its low 32 bits)."""
    x &= M32
    x ^= x >> 16
    x = (x * MUL1) & M32
    x ^= x >> 15
    x = (x * MUL2) & M32
    return x ^ (x >> 16)


def epoch_seed(seed: int, epoch: int) -> int:
    """Augmentation seed of epoch (or view slot) `epoch` for a run seeded `seed`, a pure mix.

    Keyed caches use `epoch_seed(seed, k)` for slot k, so epoch e < K of a K-view cache
    sees exactly the views an online run (or an --views all cache) sees in epoch e."""
    return int(seed) * SEED_MIX + int(epoch)


def splitmix64(seed: int, epoch: int) -> int:
    """SplitMix64's finalizer on seed * golden ratio + epoch + 1: a 63-bit torch.Generator
    seed per (seed, epoch), as `ckd.data.loaders` seeds an epoch's permutation."""
    x = ((int(seed) & M64) * 0x9E3779B97F4A7C15 + int(epoch) + 1) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return (x ^ (x >> 31)) & M63


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys folded from a (up to 64-bit) seed."""
    lo, hi = seed & M32, (seed >> 32) & M32
    k1 = mix32_int(lo ^ mix32_int(hi ^ 0x9E3779B9))
    k2 = mix32_int(k1 ^ 0x85EBCA6B)
    return k1, k2


def hash32(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit hash of (seed, index) as int64 in [0, 2^32), on indices' device."""
    idx = indices.to(torch.int64)
    k1, k2 = seed_keys(int(seed))
    h = mix32((idx & M32) ^ k1)  # bijective in the low 32 bits of the index
    return mix32(h ^ ((idx >> 32) & M32) ^ k2)


FEISTEL_ROUNDS = 6
_ROUND_KEYS = tuple((0x9E3779B9 * (r + 1)) & M32 for r in range(FEISTEL_ROUNDS))


def _feistel(x: torch.Tensor, round_keys: list[torch.Tensor], half: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """A keyed bijection on [0, 4^half) per element: balanced Feistel rounds whose round
    function is `mix32` of (right half ^ round key)."""
    for rk in round_keys:
        left, right = x >> half, x & mask
        x = (right << half) | (left ^ (mix32(right ^ rk) & mask))
    return x


def permute_below(keys: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Position of `x` in a pseudo-random permutation of [0, m) keyed by `keys` (32-bit):
    for x = 0, 1, ..., k - 1 the results are k distinct values of [0, m), a draw without
    replacement that is a pure function of (key, x). `keys`, `m` broadcast against `x`
    (int64, 0 <= x < m, 1 <= m <= 2^40). A Feistel network on the smallest power of 4
    holding m, cycle-walked (applied again while the value is >= m) into [0, m)."""
    powers = torch.ones(41, device=x.device, dtype=torch.int64) << torch.arange(
        41, device=x.device)
    bits = ((m - 1).unsqueeze(-1) >= powers).sum(-1)  # bit length of m - 1 (before expanding)
    half = ((bits + 1) // 2).clamp_min(1)
    round_keys = [mix32(keys ^ rk) for rk in _ROUND_KEYS]  # per key, before expanding
    x, m, half, *round_keys = torch.broadcast_tensors(x, m, half, *round_keys)
    mask = (torch.ones_like(half) << half) - 1
    y = _feistel(x, round_keys, half, mask)
    out = y >= m
    while bool(out.any()):  # a few passes: m fills over a quarter of the domain
        y[out] = _feistel(y[out], [rk[out] for rk in round_keys], half[out], mask[out])
        out = y >= m
    return y

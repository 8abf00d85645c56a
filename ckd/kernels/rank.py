"""ClassroomKD selection (ranks, gate, temperatures, loss weights and logged stats) in one
tiny Triton program, from the per-sample CE `[1+M, B]` of `distill._gt_ce_kernel`.

Same arithmetic, in the same order, as `reference.classroom_weights` +
`reference.classroom_stats` (sequential sum over the classroom, round-half-even to two
decimals, IEEE divisions via `div_rn`); only the batch mean's summation order differs
(so the official variant's rounding can differ from torch's only when a normalized
score sits within float rounding of a .005 boundary). One launch instead of ~25 small
torch ops: at B=256, C=100 those launches would cost more than the loss kernel itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(x):
    """Round half to even (torch.round) for 0 <= x <= 100, exact in fp32."""
    f = tl.floor(x + 0.5)
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where(((f - x) == 0.5) & odd, f - 1.0, f)


@triton.jit
def _rank_kernel(ce_ptr, wkl_ptr, temp_ptr, wce_ptr, st_ptr, B, M, lam, tau, beta, delta,
                 OFFICIAL: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_B: tl.constexpr):
    k = tl.arange(0, BLOCK_K)[:, None]
    kv = k <= M
    is_m = kv & (k >= 1)
    cols = tl.arange(0, BLOCK_B)[None, :]
    if SAMPLE:
        n_out = B
    else:  # batch: per-model mean over the batch of g (paper) or of CE (official)
        acc = tl.zeros([BLOCK_K, BLOCK_B], tl.float32)
        for b0 in range(0, B, BLOCK_B):
            msk = kv & ((b0 + cols) < B)
            ce = tl.load(ce_ptr + k * B + b0 + cols, mask=msk, other=0.0)
            acc += tl.where(msk, ce if OFFICIAL else tl.exp(-ce), 0.0)
        mean = tl.sum(acc, 1) / B
        n_out = 1
    sum_r = tl.zeros([BLOCK_K], tl.float32)
    n_act = tl.zeros([BLOCK_K], tl.float32)
    t_act = tl.zeros([BLOCK_K], tl.float32)
    for b0 in range(0, n_out, BLOCK_B):
        bm = (b0 + cols) < n_out
        if SAMPLE:
            ce = tl.load(ce_ptr + k * B + b0 + cols, mask=kv & bm, other=0.0)
            score = tl.where(kv & bm, tl.exp(-ce), 0.0)
        else:
            s1 = tl.exp(-mean) if OFFICIAL else mean
            score = tl.where(kv & bm, s1[:, None] + tl.zeros([BLOCK_K, BLOCK_B], tl.float32),
                             0.0)
        total = tl.zeros([BLOCK_B], tl.float32)
        for kk in range(0, M + 1):  # sequential, as the reference
            total = total + tl.sum(tl.where(k == kk, score, 0.0), 0)
        total = total[None, :]
        frac = tl.where(total > 0, tl.div_rn(score, tl.where(total > 0, total, 1.0)), 0.0)
        if OFFICIAL:
            r = tl.div_rn(_rint(frac * 100.0), 100.0) * lam
        else:
            r = lam * frac
        r_s = tl.sum(tl.where(k == 0, r, 0.0), 0)[None, :]
        if OFFICIAL:
            active = is_m & (r >= r_s)
            w_kl = tl.where(active, r, 0.0)
            w_ce = tl.sum(tl.where(k == 0, score, 0.0), 0)[None, :]
        else:
            active = is_m & (r > r_s)
            w_kl = tl.where(active, beta * r, 0.0)
            w_ce = r_s + delta
        safe = tl.where(r > 0, r, 1.0)
        temp = tl.where(active & (r > 0), 1.0 + tl.div_rn(tau * (r - r_s), safe), 1.0)
        out = (k - 1) * n_out + b0 + cols
        tl.store(wkl_ptr + out, w_kl, mask=is_m & bm)
        tl.store(temp_ptr + out, temp, mask=is_m & bm)
        tl.store(wce_ptr + b0 + cols, w_ce, mask=bm)
        sum_r += tl.sum(tl.where(kv & bm, r, 0.0), 1)
        act = tl.where(active & bm, 1.0, 0.0)
        n_act += tl.sum(act, 1)
        t_act += tl.sum(act * temp, 1)
    kk = tl.arange(0, BLOCK_K)
    mm = (kk >= 1) & (kk <= M)
    tl.store(st_ptr + kk - 1, sum_r / n_out, mask=mm)  # mentor_rank
    tl.store(st_ptr + M + kk - 1, n_act / n_out, mask=mm)  # mentor_active
    tl.store(st_ptr + 2 * M + kk - 1,
             tl.where(n_act > 0, t_act / tl.maximum(n_act, 1.0), 1.0), mask=mm)  # mentor_temp
    tl.store(st_ptr + 3 * M + kk, sum_r / n_out, mask=kk == 0)  # student_rank


def classroom_weights_fused(ce: torch.Tensor, *, tau: float, beta: float, delta: float,
                            lam: float | None, variant: str, granularity: str):
    """(w_kl [M, B], temp [M, B], w_ce [B], stats) from ce [1+M, B] fp32, one launch.
    At batch granularity the [., B] outputs are stride-0 broadcasts."""
    K, B = ce.shape
    M = K - 1
    sample = granularity == "sample"
    n = B if sample else 1
    buf = torch.empty(2 * M * n + n + 3 * M + 1, device=ce.device, dtype=torch.float32)
    w_kl = buf[: M * n].view(M, n)
    temp = buf[M * n: 2 * M * n].view(M, n)
    w_ce = buf[2 * M * n: 2 * M * n + n]
    st = buf[2 * M * n + n:]
    block_k = triton.next_power_of_2(K)
    block_b = min(triton.next_power_of_2(B), max(16, 2048 // block_k))
    _rank_kernel[(1,)](ce, w_kl, temp, w_ce, st, B, M, float(M if lam is None else lam),
                       float(tau), float(beta), float(delta), OFFICIAL=variant == "official",
                       SAMPLE=sample, BLOCK_K=block_k, BLOCK_B=block_b, num_warps=4)
    stats = {"mentor_rank": st[:M], "mentor_active": st[M: 2 * M],
             "mentor_temp": st[2 * M: 3 * M], "student_rank": st[3 * M]}
    return w_kl.expand(M, B), temp.expand(M, B), w_ce.expand(B), stats

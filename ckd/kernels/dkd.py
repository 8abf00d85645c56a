"""DKD's kernel (terms.Decoupled): alpha_ce CE + warm T^2 (w_target TCKD + w_nontarget
NCKD) of the teacher, gradient in the forward as the term kernels (triton_kernels.py), whose
loads, reduction and flags it shares."""

from __future__ import annotations

import triton
import triton.language as tl

from ckd.kernels.triton_kernels import (
    _finish,
    _load_student,
    _online,
    _reduce,
    _store_batch,
    _store_grad,
)


@triton.jit
def _dkd_sums(x, z, nt, m1, mz, iT):
    """Softmax sums at T of the student and the teacher, whole row and non-target."""
    es = tl.exp((x - m1[:, None]) * iT)
    et = tl.exp((z - mz[:, None]) * iT)
    return (tl.sum(es, 1), tl.sum(tl.where(nt, es, 0.0), 1), tl.sum(et, 1),
            tl.sum(tl.where(nt, et, 0.0), 1))


@triton.jit
def _dkd_grad(x, xv, z, y, m1, ld1, mz, iT, ldsn, ldtn, bs, bt, alpha_ce, w_tckd, w_nckd, T,
              rows, c0, grad_ptr, C, inv_B, BLOCK_C: tl.constexpr, VEC_G: tl.constexpr,
              WRITE_GRAD: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_C)
    is_y = cols[None, :] == y[:, None]
    nt = xv & ~is_y
    lqs = (x - m1[:, None]) * iT - ldsn[:, None]
    lqt = (z - mz[:, None]) * iT - ldtn[:, None]
    qs = tl.where(nt, tl.exp(lqs), 0.0)
    qt = tl.where(nt, tl.exp(lqt), 0.0)
    nckd = tl.sum(tl.where(nt, qt * (lqt - lqs), 0.0), 1)
    if WRITE_GRAD:
        g_t = tl.where(is_y, (bs - bt)[:, None], (bt - bs)[:, None] * qs)
        g = alpha_ce * (tl.exp((x - m1[:, None]) - ld1[:, None]) - tl.where(is_y, 1.0, 0.0))
        g = g + T * (w_tckd * g_t + w_nckd * (qs - qt))
        _store_grad(grad_ptr, g * inv_B, rows, cols, xv, C, VEC_G)
    return nckd


@triton.jit
def _dkd_kernel(
    zs_ptr, s_sb, s_sc, zt_ptr, s_tb, s_tc, y_ptr, s_y, grad_ptr, part_ptr, cnt_ptr,
    loss_ptr, flag_ptr, out_ptr, state_ptr, B, C, inv_B, T, alpha_ce, dkd_alpha, dkd_beta, warm_val,
    epoch_ptr, warmup,
    EPOCH_FROM_PTR: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ONE_BLOCK: tl.constexpr, VEC_S: tl.constexpr, VEC_M: tl.constexpr, VEC_G: tl.constexpr,
    ACC: tl.constexpr, WRITE_GRAD: tl.constexpr, NV: tl.constexpr,
):
    """DKD: alpha_ce*CE + warm*T^2*(dkd_alpha*TCKD + dkd_beta*NCKD) per row; warm is
    min(epoch / warmup, 1) with the epoch from a device tensor, or the fp32 `warm_val`."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    y = tl.load(y_ptr + rows.to(tl.int64) * s_y, mask=rmask, other=0).to(tl.int64)
    y_ok = (y >= 0) & (y < C)
    bad_y = tl.max(tl.where(rmask & ~y_ok, 1, 0), 0)
    if EPOCH_FROM_PTR:
        warm = tl.minimum(tl.load(epoch_ptr).to(tl.float32) / warmup, 1.0)
    else:
        warm = warm_val
    w_tckd = warm * dkd_alpha
    w_nckd = warm * dkd_beta
    iT = 1.0 / T
    zero_r = tl.zeros([ROWS], ACC)
    if ONE_BLOCK:
        x, xv, bad_s = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, 0, C, BLOCK_C, VEC_S, ACC)
        z, zv, bad_m = _load_student(zt_ptr, rows, rmask, s_tb, s_tc, 0, C, BLOCK_C, VEC_M, ACC)
        m1 = tl.max(x, 1)
        m1 = tl.where(m1 == float("-inf"), 0.0, m1)
        mz = tl.max(z, 1)
        mz = tl.where(mz == float("-inf"), 0.0, mz)
        d1 = tl.sum(tl.exp(x - m1[:, None]), 1)
        is_y = tl.arange(0, BLOCK_C)[None, :] == y[:, None]
        zy = tl.sum(tl.where(is_y, x, 0.0), 1)
        ty = tl.sum(tl.where(is_y, z, 0.0), 1)
        ds, dsn, dt, dtn = _dkd_sums(x, z, xv & ~is_y, m1, mz, iT)
    else:
        m1 = zero_r + float("-inf")
        mz = zero_r + float("-inf")
        d1 = zero_r
        zy = zero_r
        ty = zero_r
        bad_s = tl.sum(tl.zeros([1], tl.int32), 0)
        bad_m = tl.sum(tl.zeros([1], tl.int32), 0)
        for c0 in range(0, C, BLOCK_C):
            x, xv, bs = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C, VEC_S,
                                      ACC)
            z, zv, bm = _load_student(zt_ptr, rows, rmask, s_tb, s_tc, c0, C, BLOCK_C, VEC_M,
                                      ACC)
            bad_s = tl.maximum(bad_s, bs)
            bad_m = tl.maximum(bad_m, bm)
            m1, d1 = _online(m1, d1, x)
            mz = tl.maximum(mz, tl.max(z, 1))
            is_y = (c0 + tl.arange(0, BLOCK_C))[None, :] == y[:, None]
            zy += tl.sum(tl.where(is_y, x, 0.0), 1)
            ty += tl.sum(tl.where(is_y, z, 0.0), 1)
        m1 = tl.where(m1 == float("-inf"), 0.0, m1)
        mz = tl.where(mz == float("-inf"), 0.0, mz)
        ds = zero_r
        dsn = zero_r
        dt = zero_r
        dtn = zero_r
        for c0 in range(0, C, BLOCK_C):
            x, xv, bs = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C, VEC_S,
                                      ACC)
            z, zv, bm = _load_student(zt_ptr, rows, rmask, s_tb, s_tc, c0, C, BLOCK_C, VEC_M,
                                      ACC)
            nt = xv & ((c0 + tl.arange(0, BLOCK_C))[None, :] != y[:, None])
            a0, a1, a2, a3 = _dkd_sums(x, z, nt, m1, mz, iT)
            ds += a0
            dsn += a1
            dt += a2
            dtn += a3
    ld1 = tl.log(d1)
    lds = tl.log(ds)
    ldsn = tl.log(dsn)
    ldt = tl.log(dt)
    ldtn = tl.log(dtn)
    log_bs = (zy - m1) * iT - lds
    log_bt = (ty - mz) * iT - ldt
    log_rs = ldsn - lds  # log(1 - b_s)
    log_rt = ldtn - ldt
    bs = tl.exp(log_bs)
    bt = tl.exp(log_bt)
    tckd = bt * (log_bt - log_bs) + tl.exp(log_rt) * (log_rt - log_rs)
    if ONE_BLOCK:
        nckd = _dkd_grad(x, xv, z, y, m1, ld1, mz, iT, ldsn, ldtn, bs, bt, alpha_ce, w_tckd,
                         w_nckd, T, rows, 0, grad_ptr, C, inv_B, BLOCK_C, VEC_G, WRITE_GRAD)
    else:
        nckd = zero_r
        for c0 in range(0, C, BLOCK_C):
            x, xv, bs_ = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C, VEC_S,
                                       ACC)
            z, zv, bm_ = _load_student(zt_ptr, rows, rmask, s_tb, s_tc, c0, C, BLOCK_C, VEC_M,
                                       ACC)
            nckd += _dkd_grad(x, xv, z, y, m1, ld1, mz, iT, ldsn, ldtn, bs, bt, alpha_ce,
                              w_tckd, w_nckd, T, rows, c0, grad_ptr, C, inv_B, BLOCK_C, VEC_G,
                              WRITE_GRAD)
    loss = alpha_ce * ((m1 - zy) + ld1) + T * T * (w_tckd * tckd + w_nckd * nckd)
    nv = tl.arange(0, NV)
    part = tl.where(nv == 0, tl.sum(tl.where(rmask, loss, 0.0), 0), 0.0)
    part += tl.where(nv == 1, bad_s, 0) + tl.where(nv == 2, bad_m, 0) + tl.where(nv == 3, bad_y, 0)
    if pid == 0:  # mentor_rank = (warm-up factor, 0, ...)
        jm = tl.arange(0, BLOCK_M)
        tl.store(out_ptr + jm, tl.where(jm == 0, warm, 0.0).to(tl.float32), mask=jm < M)
    if _finish(part_ptr, cnt_ptr, pid, part.to(ACC), NV, tl.num_programs(0)):
        tot = _reduce(part_ptr, tl.num_programs(0), NV)
        _store_batch(tot, loss_ptr, flag_ptr, state_ptr, inv_B, NV)
        tl.atomic_xchg(cnt_ptr, 0)

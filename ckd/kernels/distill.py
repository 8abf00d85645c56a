"""Triton kernels: one fused family for every distillation loss of METHOD.md.

A method is a list of *terms* j = (mentor src_j, TeKAP copy_j or -1, weight w_j[b],
temperature T_j[b]) plus a CE weight w_ce[b]; per sample

    loss_b = w_ce * CE(zs_b, y_b) + sum_j w_j T_j^2 KL(softmax(z_j/T_j) || softmax(zs/T_j))

and the kernel writes loss_b / B and the gradient row d(sum_b loss_b / B)/d zs_b in the
forward pass (as Liger-Kernel's ops/jsd.py), so the backward only scales it.

- One program per sample row; class loop in blocks of BLOCK_C with an online softmax
  (pass 1: max / sum-exp of the student at T=1 and of student and mentor at every T_j;
  pass 2: probabilities, KL and the gradient, written once in the student's dtype).
  Extra memory: the gradient plus O(B x terms); no [M, B, C] intermediate.
- Terms with weight 0 (inactive mentors) are skipped: their logits are never read.
- ClassroomKD first runs `_gt_ce_kernel` (CE of every model per sample, [1+M, B]); the
  ranking over the batch is then one tiny program (`rank.py`, the same arithmetic as
  `reference.classroom_weights`), all on device, before the main kernel.
- TeKAP noise is generated in-kernel from the counter-based hash of `rng.py`.
- Non-finite logits and out-of-range labels set bits of one int32 flag word
  (1 student, 2 mentor, 4 label) with an atomic OR (only rows that found a problem
  touch it); nothing syncs.
- DKD has its own kernel (`_dkd_kernel`), same structure, one teacher term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ckd.kernels.rng import STREAM_TEKAP, stream_key

MAX_BLOCK_C = 4096


@triton.jit
def _lo32(x):
    """Low 32 bits of a non-negative int64 (shifts only: same on every backend)."""
    return x - ((x >> 32) << 32)


@triton.jit
def _hash32(x):
    """rng.hash32 on int64 values in [0, 2**32); every product fits in int64."""
    x = x ^ (x >> 16)
    x = _lo32(x * 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _lo32(x * 0x5BD1E995)
    return x ^ (x >> 16)


@triton.jit
def _gauss(key, cols):
    """Box-Muller normal for (key, class cols), as rng.tekap_noise."""
    h1 = _hash32(key ^ (2 * cols))
    h2 = _hash32(key ^ (2 * cols + 1))
    u1 = ((h1 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _online(m, d, a):
    """Online softmax update of (running max m, running sum d) with block values a
    (masked lanes = -inf); safe when every lane so far is -inf."""
    mx = tl.maximum(m, tl.max(a, 0))
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    d = d * tl.exp(m - ref) + tl.sum(tl.exp(a - ref), 0)
    return mx, d


@triton.jit
def _pick(vec, sel):
    """Element `sel` (a one-hot mask) of a small vector, as a scalar."""
    return tl.sum(tl.where(sel, vec, 0), 0)


@triton.jit
def _gt_ce_kernel(z_ptr, s_k, s_b, s_c, y_ptr, ce_ptr, flag_ptr, B, C,
                  FLAG_BIT: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """ce[k, b] = logsumexp(z[k, b]) - z[k, b, y_b]; flags non-finite rows and bad labels."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    row = z_ptr + k * s_k + b * s_b
    offs = tl.arange(0, BLOCK_C)
    y = tl.load(y_ptr + b).to(tl.int64)
    y_ok = (y >= 0) & (y < C)
    zero = tl.sum(tl.zeros([BLOCK_C], ACC), 0)
    m = zero + float("-inf")
    d = zero
    bad = tl.zeros([BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cm = cols < C
        x = tl.load(row + cols * s_c, mask=cm, other=0.0).to(ACC)
        bad = bad | ((x - x) != 0).to(tl.int32)
        m, d = _online(m, d, tl.where(cm, x, float("-inf")))
    zy = tl.load(row + tl.where(y_ok, y, 0) * s_c).to(ACC)
    tl.store(ce_ptr + k * B + b, (m + tl.log(d) - zy).to(tl.float32))
    flag = tl.max(bad, 0) * FLAG_BIT + tl.where(y_ok, 0, 4)
    tl.atomic_or(flag_ptr, flag, mask=flag != 0)


@triton.jit
def _mentor_block(zm_ptr, s_mm, s_mb, s_mc, src, b, cols, cm, copy, root, a, one_minus_a,
                  NOISE: tl.constexpr, ACC: tl.constexpr):
    z = tl.load(zm_ptr + src * s_mm + b * s_mb + cols * s_mc, mask=cm, other=0.0).to(ACC)
    if NOISE:
        if copy >= 0:  # TeKAP copy: z_i = a * eta + (1 - a) * z, eta drawn in-kernel
            key = _hash32(_hash32(root ^ b) ^ copy)
            eta = _gauss(key, cols.to(tl.int64)).to(ACC)
            z = a * eta + one_minus_a * z
    return z


@triton.jit
def _distill_kernel(
    zs_ptr, s_sb, s_sc, zm_ptr, s_mm, s_mb, s_mc, y_ptr, src_ptr, copy_ptr,
    w_ptr, s_wj, s_wb, t_ptr, s_tj, s_tb, wce_ptr, s_wce,
    grad_ptr, s_gb, loss_ptr, flag_ptr,
    C, J, inv_B, root, a, one_minus_a,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, NOISE: tl.constexpr,
    ACC: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    jv = tl.arange(0, BLOCK_J)
    jm = jv < J
    y = tl.load(y_ptr + b).to(tl.int64)
    y_ok = (y >= 0) & (y < C)
    root = root.to(tl.int64)
    wce = tl.load(wce_ptr + b * s_wce).to(ACC)
    w_vec = tl.load(w_ptr + jv * s_wj + b * s_wb, mask=jm, other=0.0).to(ACC)
    t_vec = tl.load(t_ptr + jv * s_tj + b * s_tb, mask=jm, other=1.0).to(ACC)
    src_vec = tl.load(src_ptr + jv, mask=jm, other=0).to(tl.int64)
    copy_vec = tl.load(copy_ptr + jv, mask=jm, other=-1).to(tl.int64)
    zs_row = zs_ptr + b * s_sb
    zero = tl.sum(tl.zeros([BLOCK_C], ACC), 0)
    m1 = zero + float("-inf")
    d1 = zero
    ms = tl.full([BLOCK_J], float("-inf"), ACC)
    ds = tl.zeros([BLOCK_J], ACC)
    mm = tl.full([BLOCK_J], float("-inf"), ACC)
    dm = tl.zeros([BLOCK_J], ACC)
    bad_s = tl.zeros([BLOCK_C], tl.int32)
    bad_m = tl.zeros([BLOCK_C], tl.int32)
    # pass 1: softmax normalizers of the student (T=1 and every T_j) and of every term
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cm = cols < C
        x = tl.load(zs_row + cols * s_sc, mask=cm, other=0.0).to(ACC)
        bad_s = bad_s | ((x - x) != 0).to(tl.int32)
        m1, d1 = _online(m1, d1, tl.where(cm, x, float("-inf")))
        for j in range(J):
            sel = jv == j
            w = _pick(w_vec, sel)
            if w != 0.0:
                T = _pick(t_vec, sel)
                z = _mentor_block(zm_ptr, s_mm, s_mb, s_mc, _pick(src_vec, sel), b, cols, cm,
                                  _pick(copy_vec, sel), root, a, one_minus_a, NOISE, ACC)
                bad_m = bad_m | ((z - z) != 0).to(tl.int32)
                msj, dsj = _online(_pick(ms, sel), _pick(ds, sel),
                                   tl.where(cm, x / T, float("-inf")))
                mmj, dmj = _online(_pick(mm, sel), _pick(dm, sel),
                                   tl.where(cm, z / T, float("-inf")))
                ms = tl.where(sel, msj, ms)
                ds = tl.where(sel, dsj, ds)
                mm = tl.where(sel, mmj, mm)
                dm = tl.where(sel, dmj, dm)
    # log-softmax as (a - max) - log(sum): never round max + log(sum) into one number,
    # whose error T^2 would amplify. Inactive terms keep d = 0: log of 1 (never used).
    ld1 = tl.log(d1)
    lds = tl.log(tl.where(ds > 0, ds, 1.0))
    ldm = tl.log(tl.where(dm > 0, dm, 1.0))
    zy = tl.load(zs_row + tl.where(y_ok, y, 0) * s_sc).to(ACC)
    kl = tl.zeros([BLOCK_J], ACC)
    # pass 2: probabilities, KL per term and the gradient row (written once)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cm = cols < C
        x = tl.load(zs_row + cols * s_sc, mask=cm, other=0.0).to(ACC)
        g = wce * (tl.exp((x - m1) - ld1) - tl.where(cols == y, 1.0, 0.0))
        for j in range(J):
            sel = jv == j
            w = _pick(w_vec, sel)
            if w != 0.0:
                T = _pick(t_vec, sel)
                z = _mentor_block(zm_ptr, s_mm, s_mb, s_mc, _pick(src_vec, sel), b, cols, cm,
                                  _pick(copy_vec, sel), root, a, one_minus_a, NOISE, ACC)
                lq = (x / T - _pick(ms, sel)) - _pick(lds, sel)
                lp = (z / T - _pick(mm, sel)) - _pick(ldm, sel)
                pm = tl.exp(lp)
                kl = tl.where(sel, kl + tl.sum(tl.where(cm, pm * (lp - lq), 0.0), 0), kl)
                g = g + (w * T) * (tl.exp(lq) - pm)
        if WRITE_GRAD:
            tl.store(grad_ptr + b * s_gb + cols, (g * inv_B).to(grad_ptr.dtype.element_ty),
                     mask=cm)
    loss = wce * ((m1 - zy) + ld1) + tl.sum(w_vec * t_vec * t_vec * kl, 0)
    tl.store(loss_ptr + b, (loss * inv_B).to(loss_ptr.dtype.element_ty))
    flag = tl.max(bad_s, 0) + 2 * tl.max(bad_m, 0) + tl.where(y_ok, 0, 4)
    tl.atomic_or(flag_ptr, flag, mask=flag != 0)


@triton.jit
def _dkd_kernel(
    zs_ptr, s_sb, s_sc, zt_ptr, s_tb, s_tc, y_ptr, grad_ptr, s_gb, loss_ptr, flag_ptr,
    C, inv_B, T, alpha_ce, w_tckd, w_nckd,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """DKD: alpha_ce*CE + w_tckd*T^2*TCKD + w_nckd*T^2*NCKD per row (w_* include warm-up)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    y = tl.load(y_ptr + b).to(tl.int64)
    y_ok = (y >= 0) & (y < C)
    zs_row = zs_ptr + b * s_sb
    zt_row = zt_ptr + b * s_tb
    zero = tl.sum(tl.zeros([BLOCK_C], ACC), 0)
    ninf = zero + float("-inf")
    m1, d1, ms, ds, msn, dsn = ninf, zero, ninf, zero, ninf, zero
    mt, dt, mtn, dtn = ninf, zero, ninf, zero
    bad_s = tl.zeros([BLOCK_C], tl.int32)
    bad_m = tl.zeros([BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cm = cols < C
        nt = cm & (cols != y)
        x = tl.load(zs_row + cols * s_sc, mask=cm, other=0.0).to(ACC)
        z = tl.load(zt_row + cols * s_tc, mask=cm, other=0.0).to(ACC)
        bad_s = bad_s | ((x - x) != 0).to(tl.int32)
        bad_m = bad_m | ((z - z) != 0).to(tl.int32)
        m1, d1 = _online(m1, d1, tl.where(cm, x, float("-inf")))
        ms, ds = _online(ms, ds, tl.where(cm, x / T, float("-inf")))
        msn, dsn = _online(msn, dsn, tl.where(nt, x / T, float("-inf")))
        mt, dt = _online(mt, dt, tl.where(cm, z / T, float("-inf")))
        mtn, dtn = _online(mtn, dtn, tl.where(nt, z / T, float("-inf")))
    ld1 = tl.log(d1)
    lds = tl.log(ds)
    ldsn = tl.log(dsn)
    ldt = tl.log(dt)
    ldtn = tl.log(dtn)
    y_safe = tl.where(y_ok, y, 0)
    zy = tl.load(zs_row + y_safe * s_sc).to(ACC)
    ty = tl.load(zt_row + y_safe * s_tc).to(ACC)
    log_bs = (zy / T - ms) - lds
    log_bt = (ty / T - mt) - ldt
    log_rs = (msn - ms) + (ldsn - lds)  # log(1 - b_s)
    log_rt = (mtn - mt) + (ldtn - ldt)
    bs = tl.exp(log_bs)
    bt = tl.exp(log_bt)
    tckd = bt * (log_bt - log_bs) + tl.exp(log_rt) * (log_rt - log_rs)
    nckd = zero
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cm = cols < C
        nt = cm & (cols != y)
        x = tl.load(zs_row + cols * s_sc, mask=cm, other=0.0).to(ACC)
        z = tl.load(zt_row + cols * s_tc, mask=cm, other=0.0).to(ACC)
        lqs = (x / T - msn) - ldsn
        lqt = (z / T - mtn) - ldtn
        qs = tl.where(nt, tl.exp(lqs), 0.0)
        qt = tl.where(nt, tl.exp(lqt), 0.0)
        nckd += tl.sum(tl.where(nt, qt * (lqt - lqs), 0.0), 0)
        is_y = cols == y
        g_t = tl.where(is_y, bs - bt, (bt - bs) * qs)
        g = alpha_ce * (tl.exp((x - m1) - ld1) - tl.where(is_y, 1.0, 0.0))
        g = g + T * (w_tckd * g_t + w_nckd * (qs - qt))
        if WRITE_GRAD:
            tl.store(grad_ptr + b * s_gb + cols, (g * inv_B).to(grad_ptr.dtype.element_ty),
                     mask=cm)
    loss = alpha_ce * ((m1 - zy) + ld1) + T * T * (w_tckd * tckd + w_nckd * nckd)
    tl.store(loss_ptr + b, (loss * inv_B).to(loss_ptr.dtype.element_ty))
    flag = tl.max(bad_s, 0) + 2 * tl.max(bad_m, 0) + tl.where(y_ok, 0, 4)
    tl.atomic_or(flag_ptr, flag, mask=flag != 0)


# ----------------------------------------------------------------------------- launchers
def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_size(C: int, block_c: int | None = None) -> int:
    """Class block: the whole row up to MAX_BLOCK_C, else an online-softmax loop."""
    if block_c is not None:
        return triton.next_power_of_2(block_c)
    return min(triton.next_power_of_2(C), MAX_BLOCK_C)


def _warps(block: int) -> int:
    # sm_90 ptxas (tests/test_kernels_compile.py): BLOCK 1024 / 4 warps ~110 registers,
    # BLOCK 4096 / 16 warps ~115, no spills
    return min(16, max(4, block // 256))


def new_flag(device: torch.device) -> torch.Tensor:
    """The 0-dim int32 flag word the kernels OR their bits into."""
    return torch.zeros((), device=device, dtype=torch.int32)


def gt_ce(zs: torch.Tensor, zm: torch.Tensor | None, y: torch.Tensor, flag: torch.Tensor,
          block_c: int | None = None) -> torch.Tensor:
    """CE of the student and of every mentor per sample: ce [1+M, B] fp32."""
    B, C = zs.shape
    M = 0 if zm is None else zm.shape[0]
    ce = torch.empty(1 + M, B, device=zs.device, dtype=torch.float32)
    blk = block_size(C, block_c)
    _gt_ce_kernel[(B, 1)](zs, 0, zs.stride(0), zs.stride(1), y, ce, flag, B, C,
                          FLAG_BIT=1, BLOCK_C=blk, ACC=_acc_dtype(zs.dtype),
                          num_warps=_warps(blk))
    if M:
        _gt_ce_kernel[(B, M)](zm, zm.stride(0), zm.stride(1), zm.stride(2), y, ce[1:],
                              flag, B, C, FLAG_BIT=2, BLOCK_C=blk,
                              ACC=_acc_dtype(zs.dtype), num_warps=_warps(blk))
    return ce


def fused_distill(zs, zm, y, src, copy, w, t, wce, flag, *, noise=None, write_grad=True,
                  block_c=None):
    """Launch the main kernel. src/copy: int32 [J] device tensors; w, t: [J, B] (any
    strides, e.g. stride 0 over B); wce: [B]; noise: (seed, step, a) for TeKAP copies.
    Returns (loss_rows [B] fp32 (fp64 for fp64 students) already divided by B,
    grad [B, C] or None); problems are OR-ed into `flag` (see new_flag)."""
    B, C = zs.shape
    J = int(src.numel()) if w.numel() else 0
    dev = zs.device
    loss_rows = torch.empty(B, device=dev, dtype=_loss_dtype(zs.dtype))
    grad = torch.empty_like(zs, memory_format=torch.contiguous_format) if write_grad else None
    zm_arg, ms = (zs, (0, 0, 0)) if zm is None else (zm, zm.stride())
    root, a = 0, 0.0
    if noise is not None:
        seed, step, a = noise
        root = stream_key(STREAM_TEKAP, int(seed), int(step))
    blk = block_size(C, block_c)
    _distill_kernel[(B,)](
        zs, zs.stride(0), zs.stride(1), zm_arg, *ms, y, src, copy,
        w, w.stride(0), w.stride(1), t, t.stride(0), t.stride(1), wce, wce.stride(0),
        grad if write_grad else loss_rows, C if write_grad else 0, loss_rows, flag,
        C, J, 1.0 / B, root, float(a), float(1.0 - a),
        BLOCK_C=blk, BLOCK_J=triton.next_power_of_2(max(J, 1)), NOISE=noise is not None,
        ACC=_acc_dtype(zs.dtype), WRITE_GRAD=write_grad, num_warps=_warps(blk))
    return loss_rows, grad


def fused_dkd(zs, zt, y, flag, *, T, alpha_ce, w_tckd, w_nckd, write_grad=True, block_c=None):
    """Launch the DKD kernel on the teacher logits zt [B, C] (any strides)."""
    B, C = zs.shape
    dev = zs.device
    loss_rows = torch.empty(B, device=dev, dtype=_loss_dtype(zs.dtype))
    grad = torch.empty_like(zs, memory_format=torch.contiguous_format) if write_grad else None
    blk = block_size(C, block_c)
    _dkd_kernel[(B,)](
        zs, zs.stride(0), zs.stride(1), zt, zt.stride(0), zt.stride(1), y,
        grad if write_grad else loss_rows, C if write_grad else 0, loss_rows, flag,
        C, 1.0 / B, float(T), float(alpha_ce), float(w_tckd), float(w_nckd),
        BLOCK_C=blk, ACC=_acc_dtype(zs.dtype), WRITE_GRAD=write_grad, num_warps=_warps(blk))
    return loss_rows, grad

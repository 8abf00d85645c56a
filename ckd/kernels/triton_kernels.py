"""Triton kernels: one fused family for every distillation loss of the methods.

A method is a list of *terms* j (a mentor row, optionally a TeKAP noisy copy of the
teacher, a weight w_j[b] and a temperature T_j[b]) plus a CE weight w_ce[b]; per sample

    loss_b = w_ce * CE(zs_b, y_b) + sum_j w_j T_j^2 KL(softmax(z_j/T_j) || softmax(zs/T_j))

and the kernel writes the gradient row d(sum_b loss_b / B)/d zs_b in the forward pass (as
Liger-Kernel's ops/jsd.py), so the backward only scales it.

Memory traffic (the point of the design):
- C <= MAX_BLOCK_C: each program holds ROWS whole rows in registers. The student tile
  [ROWS, C] and all term tiles [TERMS, ROWS, C] are loaded by one `tl.load` each (every
  mentor's load in flight together); the maxima, the multi-temperature softmax sums, the
  KL and the gradient are computed from those registers: every row is read from global
  memory once and the gradient written once. Above MAX_BLOCK_C a row is split across
  programs (`split_rows.py`: read once, merged in a fixed order); per-sample ranking, whose
  temperatures need the row's CE first, keeps this kernel's class loop (3 passes).
- 128-bit loads: when a tensor's row strides are multiples of 16 bytes (the cache pads
  its rows, `ckd.row_align.aligned_rows`), the launcher passes VEC = 16 / itemsize and
  the kernel declares the alignment (`tl.multiple_of`) and loads whole VEC groups (the
  pad lanes are masked out of the math).
- The batch loss and the statistics are reduced without an extra launch: every program
  writes its partial sums, and the last program to finish (an atomic ticket, reset by
  that program) adds them in a fixed tree order (`_reduce`: tiles of partials, each a
  block-wise tl.sum; bit-identical run to run) and writes the scalars.
- Selection (ClassroomKD): at sample granularity inside the kernel, from the student's
  own CE and the mentors' cached statistics (log-probability of the true class), with no
  pass over mentor logits; at batch granularity one small kernel before (`rank.py`).
- Per-step scalars (the dgkd/TeKAP key's step, the dkd epoch) come from a device tensor
  or a fixed-width i32/fp32 argument that Triton does not specialize: no recompiles
  while training, and a CUDA graph replays the right values.
- Non-finite logits and out-of-range labels set bits of the int32 flag output
  (1 student, 2 mentor, 4 label).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ckd.hashing_triton import mix32_tl
from ckd.kernels.rng import STREAM_DGKD, STREAM_TEKAP

_DGKD = tl.constexpr(STREAM_DGKD)
_TEKAP = tl.constexpr(STREAM_TEKAP)

MAX_BLOCK_C = 4096  # whole rows in registers up to this many classes
ROW_TILE = 1024  # elements of one row-vector tile per program (8 per thread at 4 warps)
# elements of the partial-sums tile the last program reduces per step (_reduce)
REDUCE_TILE = tl.constexpr(1024)
MODE_TABLE, MODE_DGKD, MODE_SAMPLE = 0, 1, 2  # where the term weights come from
# per-step integer arguments: never specialized on their value (no recompiles mid-run)
UNSPECIALIZED = ["seed32", "step_val"]
# launch options of every kernel that runs ClassroomKD's selection (`select`): no fused
# multiply-add contraction, so each operation rounds once as in the eager reference's
# separate torch ops (r_m - r_s with r_m = q_m * lam contracted to fma(q_m, lam, -r_s)
# turns an exact tie into a temperature of 1 + 1e-8; docs/METHODS.md, rounding contract)
SELECTION_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _hash32(x):
    """ckd.hashing.mix32 on int64 values in [0, 2**32) (mixed as uint32)."""
    return mix32_tl(x.to(tl.uint32)).to(tl.int64)


@triton.jit
def _stream_key(stream, seed32, step_val, step_ptr, STEP_FROM_PTR: tl.constexpr):
    """rng.stream_key(stream, seed, step) in-kernel; the step from a device tensor or a
    fixed-width argument (both taken mod 2**32)."""
    if STEP_FROM_PTR:
        step = tl.load(step_ptr).to(tl.int64)
    else:
        step = step_val.to(tl.int64)
    seed = seed32.to(tl.int64) & 0xFFFFFFFF
    return _hash32(_hash32(seed ^ stream) ^ (step & 0xFFFFFFFF))


@triton.jit
def _gauss(key, cols, ACC: tl.constexpr):
    """Box-Muller normal for (key, class cols) in ACC, as rng.tekap_noise."""
    h1 = _hash32(key ^ (2 * cols))
    h2 = _hash32(key ^ (2 * cols + 1))
    u1 = ((h1 >> 8) + 1).to(ACC) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(ACC) * 5.9604644775390625e-08
    if ACC == tl.float64:  # fp64 sqrt is correctly rounded (sqrt_rn is fp32-only)
        r = tl.sqrt(-2.0 * tl.log(u1))
    else:
        r = tl.sqrt_rn(-2.0 * tl.log(u1))
    return r * tl.cos(6.283185307179586 * u2)


@triton.jit
def _rint(x):
    """Round half to even (torch.round) for 0 <= x <= 100, exact in fp32."""
    f = tl.floor(x + 0.5)
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where(((f - x) == 0.5) & odd, f - 1.0, f)


@triton.jit
def select(s_score, m_score, m_ok, lam, tau, beta, delta, OFFICIAL: tl.constexpr,
           BLOCK_T: tl.constexpr):
    """ClassroomKD selection, the arithmetic of reference.classroom_weights in its order,
    one IEEE rounding per operation (launched with SELECTION_OPTIONS: no contraction).

    s_score [N] (student), m_score [BLOCK_T, N] (mentors, m_ok marks real ones).
    Returns (r_s [N], r_m, active, w_kl, temp [BLOCK_T, N], w_ce [N])."""
    jv = tl.arange(0, BLOCK_T)[:, None]
    m_score = tl.where(m_ok, m_score, 0.0)
    total = s_score
    for k in tl.static_range(BLOCK_T):  # sequential sum over the classroom
        total = total + tl.sum(tl.where(jv == k, m_score, 0.0), 0)
    pos = total > 0
    safe_total = tl.where(pos, total, 1.0)
    f_s = tl.where(pos, tl.div_rn(s_score, safe_total), 0.0)
    f_m = tl.where(pos[None, :], tl.div_rn(m_score, safe_total[None, :]), 0.0)
    if OFFICIAL:
        r_s = tl.div_rn(_rint(f_s * 100.0), 100.0) * lam
        r_m = tl.div_rn(_rint(f_m * 100.0), 100.0) * lam
        active = m_ok & (r_m >= r_s[None, :])
        w_kl = tl.where(active, r_m, 0.0)
        w_ce = s_score
    else:
        r_s = lam * f_s
        r_m = lam * f_m
        active = m_ok & (r_m > r_s[None, :])
        w_kl = tl.where(active, beta * r_m, 0.0)
        w_ce = r_s + delta
    safe = tl.where(r_m > 0, r_m, 1.0)
    temp = tl.where(active & (r_m > 0), 1.0 + tl.div_rn(tau * (r_m - r_s[None, :]), safe), 1.0)
    return r_s, r_m, active, w_kl, temp, w_ce


@triton.jit
def _load_student(ptr, rows, rmask, s_b, s_c, c0, C, BLOCK_C: tl.constexpr,
                  VEC: tl.constexpr, ACC: tl.constexpr):
    """Student tile [ROWS, BLOCK_C] in ACC, -inf outside the row; plus its bad-lane count."""
    cols = c0 + tl.arange(0, BLOCK_C)
    valid = rmask[:, None] & (cols < C)[None, :]
    if VEC > 1:  # row starts are 16-byte aligned: load whole VEC groups (pad lanes masked)
        base = tl.multiple_of(rows.to(tl.int64) * s_b, [VEC])
        in_group = (cols // VEC) < tl.cdiv(C, VEC)  # whole VEC groups: constant per group
        x = tl.load(ptr + base[:, None] + cols[None, :],
                    mask=rmask[:, None] & in_group[None, :], other=0.0)
    else:
        x = tl.load(ptr + rows.to(tl.int64)[:, None] * s_b + cols[None, :] * s_c, mask=valid,
                    other=0.0)
    x = x.to(ACC)
    bad = tl.max(tl.max(tl.where(valid & ((x - x) != 0), 1, 0), 1), 0)
    return tl.where(valid, x, float("-inf")), valid, bad


@triton.jit
def _load_terms(zm_ptr, rows, rmask, s_mm, s_mb, s_mc, c0, C, kept, root, noise_a, src, copy,
                NT: tl.constexpr, NOISE: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
                ACC: tl.constexpr):
    """Term tiles [BLOCK_T, ROWS, BLOCK_C] (one load for every term). Term j reads mentor
    src[j] ([BLOCK_T, 1, 1], from the term table), TeKAP's noisy copy copy[j] of it when
    copy[j] >= 0 and NOISE. `kept` [BLOCK_T, 1] masks terms that need not be read."""
    jv = tl.arange(0, BLOCK_T)[:, None, None]
    cols = c0 + tl.arange(0, BLOCK_C)[None, None, :]
    src = src.to(tl.int64)
    tmask = (jv < NT) & (kept[:, :, None] != 0)
    valid = tmask & rmask[None, :, None] & (cols < C)
    r64 = rows.to(tl.int64)[None, :, None]
    if VEC > 1:
        base = tl.multiple_of(src * s_mm + r64 * s_mb, [VEC, VEC, VEC])
        in_group = (cols // VEC) < tl.cdiv(C, VEC)
        z = tl.load(zm_ptr + base + cols, mask=tmask & rmask[None, :, None] & in_group,
                    other=0.0)
    else:
        z = tl.load(zm_ptr + src * s_mm + r64 * s_mb + cols * s_mc, mask=valid, other=0.0)
    z = z.to(ACC)
    bad = tl.max(tl.max(tl.max(tl.where(valid & ((z - z) != 0), 1, 0), 2), 1), 0)
    if NOISE:  # TeKAP copy i: z_i = a * eta + (1 - a) * z, eta drawn in-kernel
        key = _hash32(_hash32(root ^ r64) ^ copy.to(tl.int64))
        eta = _gauss(key, cols.to(tl.int64), ACC)
        z = tl.where(copy >= 0, noise_a * eta + (1.0 - noise_a) * z, z)
    return tl.where(valid, z, float("-inf")), valid, bad


@triton.jit
def _online(m, d, x):
    """Online softmax over class blocks: (running row max, running sum of exp(x - max))
    updated with the block x [ROWS, BLOCK_C] (-inf lanes; safe while a row is all -inf)."""
    mx = tl.maximum(m, tl.max(x, 1))
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    return mx, d * tl.exp(m - ref) + tl.sum(tl.exp(x - ref[:, None]), 1)


@triton.jit
def _finish(part_ptr, cnt_ptr, pid, values, NV: tl.constexpr, n_parts):
    """Write partial sums [NV] number `pid`; True in the writer that finishes last of
    `n_parts` (it then owns every partial; the ticket is reset for the next launch)."""
    tl.store(part_ptr + pid * NV + tl.arange(0, NV), values)
    tl.debug_barrier()  # every thread's partials are written before the ticket
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == n_parts - 1
    return last


@triton.jit
def _reduce(part_ptr, nprog, NV: tl.constexpr):
    """Column sums of the partials [nprog, NV] in a fixed tree order: REDUCE_TILE // NV
    programs' partials per step, loaded as one tile and summed by a block-wise tl.sum
    (a tree), the steps in program order. Bit-identical run to run for a launch
    configuration; ceil(nprog / CHUNK) dependent steps, whose loads do not depend on each
    other (4096 programs with NV = 32: 128 steps of 32, where a serial loop took 4096)."""
    CHUNK: tl.constexpr = REDUCE_TILE // NV
    cols = tl.arange(0, NV)
    acc = tl.zeros([NV], tl.float32).to(part_ptr.dtype.element_ty)
    for p0 in range(0, nprog, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        tile = tl.load(part_ptr + p[:, None] * NV + cols[None, :], mask=(p < nprog)[:, None],
                       other=0.0, cache_modifier=".cg")
        acc += tl.sum(tile, 0)
    return acc


@triton.jit
def _acc_scalars(inv_B, noise_a, scal_ptr, ACC: tl.constexpr):
    """1 / B and TeKAP's a in ACC: the fp32 arguments, or in fp64 from `scal_ptr` (a float
    argument is fp32: 1e-8 off in an fp64 loss). fp32 kernels keep the arguments, which
    leave ptxas the register allocation it had (a load spilled 8 bytes at C = 1000)."""
    if ACC == tl.float64:
        inv_B = tl.load(scal_ptr)
        noise_a = tl.load(scal_ptr + 1)
    return inv_B, noise_a


@triton.jit
def _store_batch(tot, loss_ptr, flag_ptr, state_ptr, inv_B, NV: tl.constexpr):
    """The batch outputs from the reduced partials [loss sum, bad student, bad mentor, bad
    label, ...]: the mean loss, the flag bits (1, 2, 4) and the backward's scale state."""
    tl.store(loss_ptr, (_pick(tot, 0, NV) * inv_B).to(loss_ptr.dtype.element_ty))
    flag = (tl.where(_pick(tot, 1, NV) > 0, 1, 0) + tl.where(_pick(tot, 2, NV) > 0, 2, 0)
            + tl.where(_pick(tot, 3, NV) > 0, 4, 0))
    tl.store(flag_ptr, flag.to(tl.int32))
    tl.store(state_ptr, tl.full([], 1.0, state_ptr.dtype.element_ty))  # no scale yet


@triton.jit
def _as_f32(n):
    """An int argument as fp32. A launch specializes an int equal to 1 into a Python
    constant (no `.to`): adding a tensor zero makes both forms a tensor."""
    return (tl.zeros([], tl.int32) + n).to(tl.float32)


@triton.jit
def _pick(vec, i, NV: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, NV) == i, vec, 0.0), 0)


@triton.jit
def _term_setup(src_ptr, jv, seed32, step_val, step_ptr, NT: tl.constexpr,
                BLOCK_T: tl.constexpr, MODE: tl.constexpr, NOISE: tl.constexpr,
                SRC_PREFIX: tl.constexpr, COPY_FROM_TABLE: tl.constexpr,
                DROP_THRESHOLD: tl.constexpr, STEP_FROM_PTR: tl.constexpr):
    """What every term reads, known before any logit is: (kept [BLOCK_T, 1], the TeKAP
    key root, source mentor and noise copy [BLOCK_T, 1, 1])."""
    kept = tl.where(jv < NT, 1, 0)
    root = tl.zeros([1], tl.int64)
    if MODE == 1:  # dgkd: keep mask from the key; none kept -> the teacher
        key = _stream_key(_DGKD, seed32, step_val, step_ptr, STEP_FROM_PTR)
        h = _hash32(key ^ jv.to(tl.int64))
        kept = tl.where((jv < NT) & (h >= DROP_THRESHOLD), 1, 0)
        kept = tl.where((tl.sum(kept, 0)[None, :] == 0) & (jv == 0), 1, kept)
    if NOISE:
        root = _stream_key(_TEKAP, seed32, step_val, step_ptr, STEP_FROM_PTR) + root
    # the source mentor and noise copy of every term: the common layouts as constants (no
    # load, no live registers), any other from the term table
    if SRC_PREFIX >= 0:  # term j < SRC_PREFIX reads mentor j, the others the teacher
        src = tl.where(jv < SRC_PREFIX, jv, 0)[:, :, None]
    else:
        src = tl.load(src_ptr + jv)[:, :, None]
    if COPY_FROM_TABLE:
        copy = tl.load(src_ptr + BLOCK_T + jv)[:, :, None]
    else:  # TeKAP's layout: term 0 the clean teacher, term j its copy j - 1
        copy = (jv - 1)[:, :, None]
    return kept, root, src, copy


@triton.jit
def _fixed_weights(tab_ptr, out_ptr, kept, jv, pid, tau, NT: tl.constexpr,
                   BLOCK_T: tl.constexpr, ROWS: tl.constexpr, MODE: tl.constexpr,
                   ACC: tl.constexpr):
    """(w, t [BLOCK_T, ROWS], w_ce [ROWS]) when no logit decides them: a random drop's
    kept terms (program 0 writes the stats), or the table [w | T | w_ce] (constants, or
    what the batch ranking wrote)."""
    if MODE == 1:
        n_kept = tl.sum(kept, 0).to(tl.float32)
        w = tl.where(kept != 0, 1.0 / n_kept, 0.0) + tl.zeros([BLOCK_T, ROWS], tl.float32)
        t = tl.where(kept != 0, tau, 1.0) + tl.zeros([BLOCK_T, ROWS], tl.float32)
        wce = tl.zeros([ROWS], ACC) + 1.0
        if pid == 0:  # the stats depend on the key only
            j1 = tl.arange(0, BLOCK_T)
            k1 = tl.sum(tl.where(jv == j1[None, :], kept, 0), 0)  # kept as a [BLOCK_T] row
            a1 = tl.where(k1 != 0, 1.0, 0.0)
            tl.store(out_ptr + j1, a1 / n_kept, mask=j1 < NT)
            tl.store(out_ptr + NT + j1, a1, mask=j1 < NT)
            tl.store(out_ptr + 2 * NT + j1, a1 * (tau - 1.0) + 1.0, mask=j1 < NT)
            tl.store(out_ptr + 3 * NT, 1.0)
    else:  # fixed table [w (BLOCK_T) | T (BLOCK_T) | w_ce]
        wv = tl.load(tab_ptr + jv, mask=jv < NT, other=0.0)
        tv = tl.load(tab_ptr + BLOCK_T + jv, mask=jv < NT, other=1.0)
        w = wv + tl.zeros([BLOCK_T, ROWS], tl.float32)
        t = tv + tl.zeros([BLOCK_T, ROWS], tl.float32)
        wce = tl.zeros([ROWS], ACC) + tl.load(tab_ptr + 2 * BLOCK_T).to(ACC)
    return w, t, wce


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _terms_kernel(
    zs_ptr, s_sb, s_sc, zr_ptr, s_rb, s_rc, zm_ptr, s_mm, s_mb, s_mc, y_ptr, s_y,
    st_ptr, s_stm, s_stb, tab_ptr, src_ptr, grad_ptr, part_ptr, cnt_ptr, loss_ptr, flag_ptr,
    out_ptr, state_ptr,
    B, C, inv_B, noise_a, scal_ptr, seed32, step_val, step_ptr, tau, beta, delta, lam,
    NM: tl.constexpr, NT: tl.constexpr, BLOCK_T: tl.constexpr, MODE: tl.constexpr,
    SRC_PREFIX: tl.constexpr, COPY_FROM_TABLE: tl.constexpr,
    NOISE: tl.constexpr, DELTA_TERM: tl.constexpr, OFFICIAL: tl.constexpr,
    DROP_THRESHOLD: tl.constexpr, STEP_FROM_PTR: tl.constexpr, RANK_SEPARATE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr, VEC_S: tl.constexpr,
    VEC_M: tl.constexpr, VEC_G: tl.constexpr, ACC: tl.constexpr, WRITE_GRAD: tl.constexpr,
    NV: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    jv = tl.arange(0, BLOCK_T)[:, None]  # [BLOCK_T, 1]
    inv_B, noise_a = _acc_scalars(inv_B, noise_a, scal_ptr, ACC)
    y = tl.load(y_ptr + rows.to(tl.int64) * s_y, mask=rmask, other=0).to(tl.int64)
    y_ok = (y >= 0) & (y < C)
    bad_y = tl.max(tl.where(rmask & ~y_ok, 1, 0), 0)
    # ---- weights known before any logit is read (table, dgkd key)
    kept, root, src, copy = _term_setup(src_ptr, jv, seed32, step_val, step_ptr, NT, BLOCK_T,
                                        MODE, NOISE, SRC_PREFIX, COPY_FROM_TABLE,
                                        DROP_THRESHOLD, STEP_FROM_PTR)
    zero_r = tl.zeros([ROWS], ACC)
    # ---- pass A: maxima and the student's T=1 normalizer (the only pass when ONE_BLOCK)
    if ONE_BLOCK:
        x, xv, bad_s = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, 0, C, BLOCK_C, VEC_S, ACC)
        z, zv, bad_m = _load_terms(zm_ptr, rows, rmask, s_mm, s_mb, s_mc, 0, C, kept, root,
                                   noise_a, src, copy, NT, NOISE, BLOCK_T, BLOCK_C, VEC_M, ACC)
        m1 = tl.max(x, 1)
        m1 = tl.where(m1 == float("-inf"), 0.0, m1)
        d1 = tl.sum(tl.exp(x - m1[:, None]), 1)
        mz = tl.max(z, 2)
        cols = tl.arange(0, BLOCK_C)
        zy = tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
    else:
        m1 = zero_r + float("-inf")
        d1 = zero_r
        mz = tl.zeros([BLOCK_T, ROWS], ACC) + float("-inf")
        zy = zero_r
        bad_s = tl.sum(tl.zeros([1], tl.int32), 0)
        bad_m = tl.sum(tl.zeros([1], tl.int32), 0)
        for c0 in range(0, C, BLOCK_C):
            x, xv, bs = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C, VEC_S,
                                      ACC)
            z, zv, bm = _load_terms(zm_ptr, rows, rmask, s_mm, s_mb, s_mc, c0, C, kept, root,
                                    noise_a, src, copy, NT, NOISE, BLOCK_T, BLOCK_C, VEC_M,
                                    ACC)
            bad_s = tl.maximum(bad_s, bs)
            bad_m = tl.maximum(bad_m, bm)
            m1, d1 = _online(m1, d1, x)
            mz = tl.maximum(mz, tl.max(z, 2))
            cols = c0 + tl.arange(0, BLOCK_C)
            zy += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
        m1 = tl.where(m1 == float("-inf"), 0.0, m1)
    ld1 = tl.log(d1)
    ce = (m1 - zy) + ld1  # the student's CE per row
    mz = tl.where(mz == float("-inf"), 0.0, mz)
    # ---- term weights and temperatures [BLOCK_T, ROWS], CE weight [ROWS]
    stat_part = tl.zeros([NV], tl.float32)
    nv = tl.arange(0, NV)
    if MODE == 2:  # ClassroomKD, per sample, from the mentors' cached statistics
        if RANK_SEPARATE:  # testing hook: rank with other student logits
            zr, zrv, _b = _load_student(zr_ptr, rows, rmask, s_rb, s_rc, 0, C, BLOCK_C, 1, ACC)
            mr = tl.max(zr, 1)
            mr = tl.where(mr == float("-inf"), 0.0, mr)
            zry = tl.sum(tl.where(tl.arange(0, BLOCK_C)[None, :] == y[:, None], zr, 0.0), 1)
            ce_rank = (mr - zry) + tl.log(tl.sum(tl.exp(zr - mr[:, None]), 1))
        else:
            ce_rank = ce
        logp = tl.load(st_ptr + jv * s_stm + rows.to(tl.int64)[None, :] * s_stb,
                       mask=(jv < NM) & rmask[None, :], other=0.0).to(tl.float32)
        m_ok = (jv < NM) & rmask[None, :]
        r_s, r_m, active, w_kl, temp, w_ce = select(
            tl.exp(-ce_rank.to(tl.float32)), tl.exp(logp), m_ok, lam, tau, beta, delta,
            OFFICIAL, BLOCK_T)
        w = w_kl
        t = temp
        if DELTA_TERM:
            w = tl.where(jv == NM, delta, w)
            t = tl.where(jv == NM, 1.0, t)
        wce = w_ce.to(ACC)
        act = tl.where(active & rmask[None, :], 1.0, 0.0)
        # partial sums for the logged stats: r_m, active, active * temp per mentor; r_s
        r_sum = tl.sum(tl.where(m_ok, r_m, 0.0), 1)
        a_sum = tl.sum(act, 1)
        t_sum = tl.sum(act * temp, 1)
        j1 = tl.arange(0, BLOCK_T)
        for k in tl.static_range(BLOCK_T):
            stat_part += tl.where(nv == 4 + k, tl.sum(tl.where(j1 == k, r_sum, 0.0), 0), 0.0)
            stat_part += tl.where(nv == 4 + BLOCK_T + k,
                                  tl.sum(tl.where(j1 == k, a_sum, 0.0), 0), 0.0)
            stat_part += tl.where(nv == 4 + 2 * BLOCK_T + k,
                                  tl.sum(tl.where(j1 == k, t_sum, 0.0), 0), 0.0)
        stat_part += tl.where(nv == 4 + 3 * BLOCK_T,
                              tl.sum(tl.where(rmask, r_s, 0.0), 0), 0.0)
    else:
        w, t, wce = _fixed_weights(tab_ptr, out_ptr, kept, jv, pid, tau, NT, BLOCK_T, ROWS,
                                   MODE, ACC)
    w = w.to(ACC)
    t = tl.where(w != 0, t, 1.0).to(ACC)
    inv_t = 1.0 / t
    # ---- pass B: softmax sums at every term's temperature (fixed maxima: no rescaling)
    if ONE_BLOCK:
        ds = tl.sum(tl.exp((x[None, :, :] - m1[None, :, None]) * inv_t[:, :, None]), 2)
        dm = tl.sum(tl.exp((z - mz[:, :, None]) * inv_t[:, :, None]), 2)
    else:
        ds = tl.zeros([BLOCK_T, ROWS], ACC)
        dm = tl.zeros([BLOCK_T, ROWS], ACC)
        for c0 in range(0, C, BLOCK_C):
            x, xv, bs = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C, VEC_S,
                                      ACC)
            z, zv, bm = _load_terms(zm_ptr, rows, rmask, s_mm, s_mb, s_mc, c0, C, kept, root,
                                    noise_a, src, copy, NT, NOISE, BLOCK_T, BLOCK_C, VEC_M,
                                    ACC)
            ds += tl.sum(tl.exp((x[None, :, :] - m1[None, :, None]) * inv_t[:, :, None]), 2)
            dm += tl.sum(tl.exp((z - mz[:, :, None]) * inv_t[:, :, None]), 2)
    lds = tl.log(tl.where(ds > 0, ds, 1.0))
    ldm = tl.log(tl.where(dm > 0, dm, 1.0))
    on = w != 0
    wt = tl.where(on, w * t, 0.0)
    # ---- pass C: KL per term and the gradient row (written once)
    if ONE_BLOCK:
        kl = _kl_grad(x, xv, z, zv, y, m1, ld1, mz, inv_t, lds, ldm, on, wt, wce, rows, 0,
                      grad_ptr, C, inv_B, BLOCK_C, VEC_G, WRITE_GRAD)
    else:
        kl = tl.zeros([BLOCK_T, ROWS], ACC)
        for c0 in range(0, C, BLOCK_C):
            x, xv, bs = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C, VEC_S,
                                      ACC)
            z, zv, bm = _load_terms(zm_ptr, rows, rmask, s_mm, s_mb, s_mc, c0, C, kept, root,
                                    noise_a, src, copy, NT, NOISE, BLOCK_T, BLOCK_C, VEC_M,
                                    ACC)
            kl += _kl_grad(x, xv, z, zv, y, m1, ld1, mz, inv_t, lds, ldm, on, wt, wce, rows,
                           c0, grad_ptr, C, inv_B, BLOCK_C, VEC_G, WRITE_GRAD)
    loss = wce * ce + tl.sum(tl.where(on, wt * t * kl, 0.0), 0)
    loss_sum = tl.sum(tl.where(rmask, loss, 0.0), 0)
    # ---- batch reduction: the last program adds the partials in a fixed tree order
    part = stat_part.to(ACC) + tl.where(nv == 0, loss_sum, 0.0)
    part += tl.where(nv == 1, bad_s, 0) + tl.where(nv == 2, bad_m, 0) + tl.where(nv == 3, bad_y, 0)
    if _finish(part_ptr, cnt_ptr, pid, part, NV, tl.num_programs(0)):
        tot = _reduce(part_ptr, tl.num_programs(0), NV)
        _store_batch(tot, loss_ptr, flag_ptr, state_ptr, inv_B, NV)
        if MODE == 2:
            n_out = _as_f32(B)
            for k in tl.static_range(NM):
                n_act = _pick(tot, 4 + BLOCK_T + k, NV).to(tl.float32)
                t_act = _pick(tot, 4 + 2 * BLOCK_T + k, NV).to(tl.float32)
                tl.store(out_ptr + k, _pick(tot, 4 + k, NV).to(tl.float32) / n_out)
                tl.store(out_ptr + NM + k, n_act / n_out)
                tl.store(out_ptr + 2 * NM + k,
                         tl.where(n_act > 0, t_act / tl.maximum(n_act, 1.0), 1.0))
            tl.store(out_ptr + 3 * NM, _pick(tot, 4 + 3 * BLOCK_T, NV).to(tl.float32) / n_out)
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _store_grad(grad_ptr, g, rows, cols, valid, C, VEC_G: tl.constexpr):
    """Gradient rows of C (contiguous): 128-bit stores when C is a multiple of VEC_G."""
    base = rows.to(tl.int64) * C
    if VEC_G > 1:  # C % VEC_G == 0: the row mask is constant over VEC_G groups
        base = tl.multiple_of(base, [VEC_G])
        in_group = (cols // VEC_G) < tl.cdiv(C, VEC_G)
        mask = (tl.max(valid.to(tl.int32), 1) > 0)[:, None] & in_group[None, :]
    else:
        mask = valid
    tl.store(grad_ptr + base[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _kl_grad(x, xv, z, zv, y, m1, ld1, mz, inv_t, lds, ldm, on, wt, wce, rows, c0,
             grad_ptr, C, inv_B, BLOCK_C: tl.constexpr, VEC_G: tl.constexpr,
             WRITE_GRAD: tl.constexpr):
    """KL per (term, row) of this class block; stores its gradient block (rows of C)."""
    lq = (x[None, :, :] - m1[None, :, None]) * inv_t[:, :, None] - lds[:, :, None]
    lp = (z - mz[:, :, None]) * inv_t[:, :, None] - ldm[:, :, None]
    pm = tl.exp(lp)
    kl = tl.sum(tl.where(zv, pm * (lp - lq), 0.0), 2)
    if WRITE_GRAD:
        cols = c0 + tl.arange(0, BLOCK_C)
        sm = tl.exp((x - m1[:, None]) - ld1[:, None])
        g = wce[:, None] * (sm - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
        g += tl.sum(tl.where(on[:, :, None], wt[:, :, None] * (tl.exp(lq) - pm), 0.0), 0)
        _store_grad(grad_ptr, g * inv_B, rows, cols, xv, C, VEC_G)
    return kl


@triton.jit
def _scale_kernel(grad_ptr, out_ptr, gout_ptr, state_ptr, cnt_ptr, N,
                  IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
    """Backward: gradient * upstream gradient. In place (fp32/bf16/fp64 students) it
    multiplies by upstream / already-applied factor, which is 1 (no memory traffic) for
    an upstream gradient of 1; the last program records the applied factor, so a second
    backward through the same graph stays right. Out of place (fp16 students): the fp32
    gradient times the fp32 upstream gradient, rounded to fp16 once."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(gout_ptr)
    if IN_PLACE:
        f = g / tl.load(state_ptr)
        if f != 1.0:
            v = tl.load(grad_ptr + offs, mask=m)
            tl.store(grad_ptr + offs, (v * f).to(grad_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
            tl.store(state_ptr, g)
            tl.atomic_xchg(cnt_ptr, 0)
    else:
        v = tl.load(grad_ptr + offs, mask=m)
        tl.store(out_ptr + offs, (v * g).to(out_ptr.dtype.element_ty), mask=m)

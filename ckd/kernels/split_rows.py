"""Large vocabularies: a term table's loss with each long row split across programs.

`_terms_kernel`'s class-blocked path gives a row one program and reads it three times
(maxima, softmax sums, KL and gradient). Here, for every table whose weights and
temperatures are known before any logit is read (fixed tables, the batch ranking's table,
a random drop), row b is cut into SPLIT class ranges of CHUNK classes, one program each:

1. each program streams its range once from global memory and keeps online-softmax
   partials: the student's running max and sums of exp((x - max) / T) at T = 1 and at
   every term's T_j, every term's running max and sum of exp((z_j - max) / T_j), the
   true-class logit, the bad-value flags (the rescaling of a sum when its max grows is
   the one of `triton_kernels._online`, at temperature T);
2. it writes them to the row's partials and takes the row's ticket; the program that
   finishes the row last merges the SPLIT partials in a fixed order (a block-wise tl.sum
   over the split axis: the same tree every run, bit-identical run to run) into the
   row's normalizers, then
3. walks the row once more for the KL and writes the gradient row (Liger style: the
   backward only scales it). The ranges it reads were read by the row's programs just
   before, so the walk is served by L2 while the row fits there (a kd row at C = 32000
   is 192 KB; HBM sees the row once).
4. the row's loss goes to the batch partials, and the last row to finish reduces them in
   the fixed tree order of `triton_kernels._reduce`.

Per-sample ranking (ClassroomKD at sample granularity) needs the row's CE before any
temperature is known: it keeps `_terms_kernel`'s three-pass path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ckd.kernels.triton_kernels import (
    UNSPECIALIZED,
    _acc_scalars,
    _finish,
    _fixed_weights,
    _kl_grad,
    _load_student,
    _load_terms,
    _reduce,
    _store_batch,
    _term_setup,
)

# m1, d1, zy, bad_s, bad_m (padded to 8): then ds, mz, dm of every term
ROW_SCALARS = tl.constexpr(8)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _split_kernel(
    zs_ptr, s_sb, s_sc, zm_ptr, s_mm, s_mb, s_mc, y_ptr, s_y, tab_ptr, src_ptr, grad_ptr,
    row_ptr, rcnt_ptr, part_ptr, cnt_ptr, loss_ptr, flag_ptr, out_ptr, state_ptr,
    B, C, inv_B, noise_a, scal_ptr, seed32, step_val, step_ptr, tau,
    NT: tl.constexpr, BLOCK_T: tl.constexpr, MODE: tl.constexpr, SRC_PREFIX: tl.constexpr,
    COPY_FROM_TABLE: tl.constexpr, NOISE: tl.constexpr, DROP_THRESHOLD: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, VEC_S: tl.constexpr, VEC_M: tl.constexpr,
    VEC_G: tl.constexpr, ACC: tl.constexpr, WRITE_GRAD: tl.constexpr, NR: tl.constexpr,
    NV: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // SPLIT
    rows = row + tl.arange(0, 1)  # [1]: the kernels' row tiles with ROWS = 1
    rmask = rows < B
    jv = tl.arange(0, BLOCK_T)[:, None]  # [BLOCK_T, 1]
    inv_B, noise_a = _acc_scalars(inv_B, noise_a, scal_ptr, ACC)
    y = tl.load(y_ptr + rows.to(tl.int64) * s_y).to(tl.int64)
    kept, root, src, copy = _term_setup(src_ptr, jv, seed32, step_val, step_ptr, NT, BLOCK_T,
                                        MODE, NOISE, SRC_PREFIX, COPY_FROM_TABLE,
                                        DROP_THRESHOLD, STEP_FROM_PTR)
    w, t, wce = _fixed_weights(tab_ptr, out_ptr, kept, jv, pid, tau, NT, BLOCK_T, 1, MODE,
                               ACC)
    w = w.to(ACC)
    t = tl.where(w != 0, t, 1.0).to(ACC)
    inv_t = 1.0 / t  # [BLOCK_T, 1]
    ninf = float("-inf")
    # ---- 1. this program's class range, streamed once: online partials
    m1 = tl.zeros([1], ACC) + ninf
    d1 = tl.zeros([1], ACC)
    zy = tl.zeros([1], ACC)
    ds = tl.zeros([BLOCK_T, 1], ACC)
    mz = tl.zeros([BLOCK_T, 1], ACC) + ninf
    dm = tl.zeros([BLOCK_T, 1], ACC)
    bad_s = tl.sum(tl.zeros([1], tl.int32), 0)
    bad_m = tl.sum(tl.zeros([1], tl.int32), 0)
    c_lo = (pid % SPLIT) * CHUNK
    for c0 in range(c_lo, tl.minimum(C, c_lo + CHUNK), BLOCK_C):
        x, xv, bs = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C, VEC_S, ACC)
        z, zv, bm = _load_terms(zm_ptr, rows, rmask, s_mm, s_mb, s_mc, c0, C, kept, root,
                                noise_a, src, copy, NT, NOISE, BLOCK_T, BLOCK_C, VEC_M, ACC)
        bad_s = tl.maximum(bad_s, bs)
        bad_m = tl.maximum(bad_m, bm)
        mx = tl.maximum(m1, tl.max(x, 1))
        ref = tl.where(mx == ninf, 0.0, mx)  # [1]
        d1 = d1 * tl.exp(m1 - ref) + tl.sum(tl.exp(x - ref[:, None]), 1)
        ds = ds * tl.exp((m1 - ref)[None, :] * inv_t) + tl.sum(
            tl.exp((x[None, :, :] - ref[None, :, None]) * inv_t[:, :, None]), 2)
        m1 = mx
        mzx = tl.maximum(mz, tl.max(z, 2))
        refz = tl.where(mzx == ninf, 0.0, mzx)  # [BLOCK_T, 1]
        dm = dm * tl.exp((mz - refz) * inv_t) + tl.sum(
            tl.exp((z - refz[:, :, None]) * inv_t[:, :, None]), 2)
        mz = mzx
        cols = c0 + tl.arange(0, BLOCK_C)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
    # ---- 2. the row's partials; the row's last program merges them
    base = row_ptr + pid.to(tl.int64) * NR
    nr = tl.arange(0, ROW_SCALARS)
    head = (tl.where(nr == 0, m1, 0.0) + tl.where(nr == 1, d1, 0.0) + tl.where(nr == 2, zy, 0.0)
            + tl.where(nr == 3, bad_s, 0).to(ACC) + tl.where(nr == 4, bad_m, 0).to(ACC))
    tl.store(base + nr, head)
    tl.store(base + ROW_SCALARS + jv, ds)
    tl.store(base + ROW_SCALARS + BLOCK_T + jv, mz)
    tl.store(base + ROW_SCALARS + 2 * BLOCK_T + jv, dm)
    tl.debug_barrier()  # every thread's partials are written before the ticket
    ticket = tl.atomic_add(rcnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLIT - 1:
        tl.atomic_xchg(rcnt_ptr + row, 0)  # zero for the next launch
        sv = tl.arange(0, BLOCK_S)[:, None]  # [BLOCK_S, 1]: the row's programs in order
        s_ok = sv < SPLIT
        p = row_ptr + (row.to(tl.int64) * SPLIT + sv) * NR
        j1 = tl.arange(0, BLOCK_T)[None, :]  # [1, BLOCK_T]
        m1s = tl.load(p + 0, mask=s_ok, other=ninf, cache_modifier=".cg")  # [BLOCK_S, 1]
        d1s = tl.load(p + 1, mask=s_ok, other=0.0, cache_modifier=".cg")
        zys = tl.load(p + 2, mask=s_ok, other=0.0, cache_modifier=".cg")
        bss = tl.load(p + 3, mask=s_ok, other=0.0, cache_modifier=".cg")
        bms = tl.load(p + 4, mask=s_ok, other=0.0, cache_modifier=".cg")
        dss = tl.load(p + ROW_SCALARS + j1, mask=s_ok, other=0.0, cache_modifier=".cg")
        mzs = tl.load(p + ROW_SCALARS + BLOCK_T + j1, mask=s_ok, other=ninf,
                      cache_modifier=".cg")
        dms = tl.load(p + ROW_SCALARS + 2 * BLOCK_T + j1, mask=s_ok, other=0.0,
                      cache_modifier=".cg")
        inv_t1 = tl.sum(tl.where(jv == j1, inv_t, 0.0), 0)[None, :]  # [1, BLOCK_T]
        big = tl.max(m1s, 0)  # [1]
        m1 = tl.where(big == ninf, 0.0, big)
        d1 = tl.sum(d1s * tl.exp(m1s - m1[None, :]), 0)
        zy = tl.sum(zys, 0)
        ds = tl.sum(dss * tl.exp((m1s - m1[None, :]) * inv_t1), 0)  # [BLOCK_T]
        bigz = tl.max(mzs, 0)
        mz1 = tl.where(bigz == ninf, 0.0, bigz)  # [BLOCK_T]
        dm = tl.sum(dms * tl.exp((mzs - mz1[None, :]) * inv_t1), 0)
        # [BLOCK_T] -> [BLOCK_T, 1], the layout of the kernels' term tiles
        ds = tl.sum(tl.where(jv == j1, ds[None, :], 0.0), 1)[:, None]
        dm = tl.sum(tl.where(jv == j1, dm[None, :], 0.0), 1)[:, None]
        mz = tl.sum(tl.where(jv == j1, mz1[None, :], 0.0), 1)[:, None]
        ld1 = tl.log(d1)
        ce = (m1 - zy) + ld1
        lds = tl.log(tl.where(ds > 0, ds, 1.0))
        ldm = tl.log(tl.where(dm > 0, dm, 1.0))
        on = w != 0
        wt = tl.where(on, w * t, 0.0)
        # ---- 3. KL and the gradient row (the ranges just read: from L2)
        kl = tl.zeros([BLOCK_T, 1], ACC)
        for c0 in range(0, C, BLOCK_C):
            x, xv, _bs = _load_student(zs_ptr, rows, rmask, s_sb, s_sc, c0, C, BLOCK_C,
                                       VEC_S, ACC)
            z, zv, _bm = _load_terms(zm_ptr, rows, rmask, s_mm, s_mb, s_mc, c0, C, kept,
                                     root, noise_a, src, copy, NT, NOISE, BLOCK_T, BLOCK_C,
                                     VEC_M, ACC)
            kl += _kl_grad(x, xv, z, zv, y, m1, ld1, mz, inv_t, lds, ldm, on, wt, wce, rows,
                           c0, grad_ptr, C, inv_B, BLOCK_C, VEC_G, WRITE_GRAD)
        loss = tl.sum(wce * ce + tl.sum(tl.where(on, wt * t * kl, 0.0), 0), 0)
        bad_y = tl.max(tl.where((y < 0) | (y >= C), 1, 0), 0)
        nv = tl.arange(0, NV)
        part = (tl.where(nv == 0, loss, 0.0) + tl.where(nv == 1, tl.max(bss, 0), 0.0)
                + tl.where(nv == 2, tl.max(bms, 0), 0.0) + tl.where(nv == 3, bad_y, 0))
        # ---- 4. the batch: the last row to finish reduces in the fixed tree order
        if _finish(part_ptr, cnt_ptr, row, part.to(ACC), NV, B):
            tot = _reduce(part_ptr, B, NV)
            _store_batch(tot, loss_ptr, flag_ptr, state_ptr, inv_B, NV)
            tl.atomic_xchg(cnt_ptr, 0)


def split_plan(B: int, C: int, block_c: int, chunk: int | None, target_programs: int
               ) -> tuple[int, int]:
    """(SPLIT, CHUNK): programs per row and classes per program (a multiple of block_c).
    `chunk` forces the range (tests lower it to split small rows); by default a row is
    split until the launch has `target_programs`, each range at least 2 blocks long."""
    if chunk is None:
        split = max(1, min(-(-target_programs // B), C // (2 * block_c)))
        chunk = -(-C // split)
    chunk = -(-max(chunk, 1) // block_c) * block_c
    return -(-C // chunk), chunk


def block_s(split: int) -> int:
    return triton.next_power_of_2(split)

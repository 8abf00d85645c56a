"""ClassroomKD selection at batch granularity: one small kernel before the loss kernel.

Every program computes the CE of its student rows (from the student's logits) and reads
the mentors' cached statistics (log-probability of the true class: no pass over mentor
logits), and writes per-model partial sums of the score; the program that finishes last
adds them in program order (deterministic), applies `distill.select` (the arithmetic of
`reference.classroom_weights`, in its order) and writes the loss kernel's term table
[w_kl | temperature | w_ce] and the logged statistics. Sample granularity needs no batch
reduction: the loss kernel selects per row itself.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ckd.kernels.triton_kernels import _finish, _load_student, _online, _pick, _reduce, select


@triton.jit
def _rank_batch_kernel(
    zr_ptr, s_rb, s_rc, y_ptr, s_y, st_ptr, s_stm, s_stb, tab_ptr, out_ptr, part_ptr, cnt_ptr,
    B, C, lam, tau, beta, delta,
    NM: tl.constexpr, BLOCK_T: tl.constexpr, OFFICIAL: tl.constexpr,
    DELTA_TERM: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ONE_BLOCK: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr, NV: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    y = tl.load(y_ptr + rows.to(tl.int64) * s_y, mask=rmask, other=0).to(tl.int64)
    if ONE_BLOCK:
        x, xv, bad = _load_student(zr_ptr, rows, rmask, s_rb, s_rc, 0, C, BLOCK_C, VEC, ACC)
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        d = tl.sum(tl.exp(x - m[:, None]), 1)
        zy = tl.sum(tl.where(tl.arange(0, BLOCK_C)[None, :] == y[:, None], x, 0.0), 1)
    else:
        m = tl.zeros([ROWS], ACC) + float("-inf")
        d = tl.zeros([ROWS], ACC)
        zy = tl.zeros([ROWS], ACC)
        for c0 in range(0, C, BLOCK_C):
            x, xv, bad = _load_student(zr_ptr, rows, rmask, s_rb, s_rc, c0, C, BLOCK_C, VEC,
                                       ACC)
            m, d = _online(m, d, x)
            zy += tl.sum(tl.where((c0 + tl.arange(0, BLOCK_C))[None, :] == y[:, None], x, 0.0),
                         1)
        m = tl.where(m == float("-inf"), 0.0, m)
    ce_s = ((m - zy) + tl.log(d)).to(tl.float32)
    jv = tl.arange(0, BLOCK_T)[:, None]
    m_ok = (jv < NM) & rmask[None, :]
    logp = tl.load(st_ptr + jv * s_stm + rows.to(tl.int64)[None, :] * s_stb, mask=m_ok,
                   other=0.0).to(tl.float32)
    if OFFICIAL:  # mean CE over the batch
        s_part = tl.sum(tl.where(rmask, ce_s, 0.0), 0)
        m_part = tl.sum(tl.where(m_ok, -logp, 0.0), 1)
    else:  # mean probability of the true class over the batch
        s_part = tl.sum(tl.where(rmask, tl.exp(-ce_s), 0.0), 0)
        m_part = tl.sum(tl.where(m_ok, tl.exp(logp), 0.0), 1)
    nv = tl.arange(0, NV)
    part = tl.where(nv == BLOCK_T, s_part, 0.0)
    j1 = tl.arange(0, BLOCK_T)
    for k in tl.static_range(BLOCK_T):
        part += tl.where(nv == k, tl.sum(tl.where(j1 == k, m_part, 0.0), 0), 0.0)
    if _finish(part_ptr, cnt_ptr, pid, part, NV, tl.num_programs(0)):
        tot = _reduce(part_ptr, tl.num_programs(0), NV)
        mean = tot / B
        score = tl.exp(-mean) if OFFICIAL else mean
        s_score = _pick(score, BLOCK_T, NV) + tl.zeros([1], tl.float32)
        m_score = tl.zeros([BLOCK_T, 1], tl.float32)
        for k in tl.static_range(BLOCK_T):
            m_score += tl.where(jv == k, _pick(score, k, NV), 0.0)
        r_s, r_m, active, w_kl, temp, w_ce = select(s_score, m_score, jv < NM, lam, tau, beta,
                                                    delta, OFFICIAL, BLOCK_T)
        w = w_kl
        t = temp
        if DELTA_TERM:  # Eq. 11: delta * L_distill(teacher; T=1) as one more term
            w = tl.where(jv == NM, delta, w)
            t = tl.where(jv == NM, 1.0, t)
        tl.store(tab_ptr + jv, w)
        tl.store(tab_ptr + BLOCK_T + jv, t)
        tl.store(tab_ptr + 2 * BLOCK_T + tl.zeros([1], tl.int32), w_ce)
        tl.store(out_ptr + jv, r_m, mask=jv < NM)  # mentor_rank
        tl.store(out_ptr + NM + jv, tl.where(active, 1.0, 0.0), mask=jv < NM)  # active
        tl.store(out_ptr + 2 * NM + jv, temp, mask=jv < NM)  # mentor_temp
        tl.store(out_ptr + 3 * NM + tl.zeros([1], tl.int32), r_s)  # student_rank
        tl.atomic_xchg(cnt_ptr, 0)

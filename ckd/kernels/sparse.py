"""Triton kernels of the distillation losses on sparse mentors (`SparseMentors`): the fused
counterpart of `sparse_reference.py` (its docstring states the math).

Same term table as the dense kernels (terms.py: term j = mentor src_j, TeKAP copy_j,
weight w_j[b], temperature T_j[b]), one program per sample row:

1. per term, the mentor's target over its K slots from the stored ids, logits, counts and
   row statistics (top-k: softmax over the slots and the rest bucket's modelled mass;
   sampled: self-normalized importance weights), and the student's logits gathered at
   the ids, all in registers;
2. one pass over the student row: its softmax normalizer at T=1 and at every T_j, and at
   every T_j the normalizer of the classes outside the slots (the student's rest mass;
   membership by comparing a class block against the slot ids);
3. a second pass writes the gradient row once (the dense part q, the rest rescaling and
   the slot targets scattered by the same comparison), Liger style: the backward only
   scales it. Nothing [M, B, C] is ever built; a mentor's storage is read once per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ckd.kernels import launch
from ckd.kernels import reference as ref
from ckd.kernels import triton_kernels as D
from ckd.kernels.output import DistillOutput
from ckd.kernels.rng import STREAM_TEKAP, as_i32, dgkd_keep_mask, stream_key
from ckd.kernels.sparse_mentors import SparseMentors
from ckd.kernels.terms import RandomDrop, Ranking, TermTable

MAX_BLOCK_ELEMS = 8192  # BLOCK_C x BLOCK_K of the class-vs-slot comparison


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
def _target(ids_ptr, z_ptr, cnt_ptr, s_m, s_b, src, b, kv, km, C, lse, rest_lse, rest_mean,
            is_sample, t, copy, root, a, one_minus_a, NOISE: tl.constexpr,
            ACC: tl.constexpr):
    """Mentor `src`'s target at inverse temperature t: (ids, w, l, log p_r, real, bad)."""
    off = src * s_m + b * s_b + kv
    cnt = tl.load(cnt_ptr + off, mask=km, other=0)
    real = km & (cnt > 0)
    ids = tl.load(ids_ptr + off, mask=km, other=0).to(tl.int64)
    z = tl.load(z_ptr + off, mask=km, other=0.0).to(ACC)
    bad = tl.max((real & (((z - z) != 0) | (ids < 0) | (ids >= C) | (cnt < 0))).to(tl.int32),
                 0)
    # row statistics: finite lse and rest mean; rest_lse finite or -inf (no rest)
    bad = bad | (((lse - lse) != 0) | ((rest_mean - rest_mean) != 0) | (rest_lse != rest_lse)
                 | (rest_lse == float("inf"))).to(tl.int32)
    ids = tl.where(real & (ids >= 0) & (ids < C), ids, 0)
    z = tl.where(real, z, 0.0)
    zt = z
    if NOISE:
        if copy >= 0:
            key = D._hash32(D._hash32(root ^ b) ^ copy)
            zt = a * D._gauss(key, ids, ACC) + one_minus_a * z
    ninf = float("-inf")
    if is_sample != 0:
        cntf = cnt.to(ACC)
        g = tl.where(real, tl.log(tl.where(real, cntf, 1.0)) + zt * t - z, ninf)
        mg = tl.max(g, 0)
        sg = tl.sum(tl.where(real, tl.exp(g - mg), 0.0), 0)
        log_zt = lse + (mg + tl.log(sg)) - tl.log(tl.sum(cntf, 0))
        w = tl.where(real, tl.exp((g - mg) - tl.log(sg)), 0.0)
        lp = zt * t - log_zt
        lp_r = t * 0.0 + ninf
    else:
        av = tl.where(real, zt * t, ninf)
        n_rest = C - tl.sum(real.to(tl.int32), 0)
        log_n = tl.log(tl.maximum(n_rest, 1).to(ACC))
        s = t
        if NOISE:
            s = tl.where(copy >= 0, t * one_minus_a, t)
        f = log_n + rest_mean * s + (rest_lse - log_n - rest_mean) * s * s
        if NOISE:
            f = f + tl.where(copy >= 0, 0.5 * (a * t) * (a * t), 0.0)
        a_r = tl.where((n_rest > 0) & (rest_lse > ninf), f, ninf)
        mx = tl.maximum(tl.max(av, 0), a_r)
        L = mx + tl.log(tl.sum(tl.where(real, tl.exp(av - mx), 0.0), 0) + tl.exp(a_r - mx))
        w = tl.where(real, tl.exp(av - L), 0.0)
        lp = av - L
        lp_r = a_r - L
    return ids, w, lp, lp_r, real, bad


@triton.jit(do_not_specialize=["root"])
def _sparse_kernel(
    zs_ptr, s_sb, s_sc, ids_ptr, z_ptr, cnt_ptr, s_m, s_b,
    lse_ptr, rlse_ptr, rmean_ptr, s_stm, s_stb, sample_ptr, y_ptr, src_ptr, copy_ptr,
    w_ptr, s_wj, s_wb, t_ptr, s_tj, s_tb, wce_ptr, s_wce, grad_ptr, s_gb, loss_ptr, flag_ptr,
    C, K, J, scal_ptr, root,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
    NOISE: tl.constexpr, ACC: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    kv = tl.arange(0, BLOCK_K)
    km = kv < K
    jv = tl.arange(0, BLOCK_J)
    jm = jv < J
    y = tl.load(y_ptr + b).to(tl.int64)
    y_ok = (y >= 0) & (y < C)
    root = root.to(tl.int64) & 0xFFFFFFFF  # an i32 argument (rng.as_i32)
    # 1 / B, TeKAP's a and 1 - a in ACC (a float argument would be fp32: 1e-8 in fp64)
    inv_B = tl.load(scal_ptr).to(ACC)
    a = tl.load(scal_ptr + 1).to(ACC)
    one_minus_a = tl.load(scal_ptr + 2).to(ACC)
    zs_row = zs_ptr + b * s_sb
    wce = tl.load(wce_ptr + b * s_wce).to(ACC)
    w_vec = tl.load(w_ptr + jv * s_wj + b * s_wb, mask=jm, other=0.0).to(ACC)
    t_vec = tl.load(t_ptr + jv * s_tj + b * s_tb, mask=jm, other=1.0).to(ACC)
    src_vec = tl.load(src_ptr + jv, mask=jm, other=0).to(tl.int64)
    copy_vec = tl.load(copy_ptr + jv, mask=jm, other=-1).to(tl.int64)
    zero = tl.sum(tl.zeros([BLOCK_C], ACC), 0)
    # 1. per-term targets and the student's logits at the slot ids
    tw = tl.zeros([BLOCK_J, BLOCK_K], ACC)
    tlp = tl.zeros([BLOCK_J, BLOCK_K], ACC)
    xs_ids = tl.zeros([BLOCK_J, BLOCK_K], ACC)
    tid = tl.zeros([BLOCK_J, BLOCK_K], tl.int64) - 1
    lpr = tl.full([BLOCK_J], float("-inf"), ACC)
    bad_m = zero.to(tl.int32)
    for j in range(J):
        sel = jv == j
        w = _pick(w_vec, sel)
        if w != 0.0:
            src = _pick(src_vec, sel)
            sb = src * s_stm + b * s_stb
            ids, wt, lp, lp_r, real, bad = _target(
                ids_ptr, z_ptr, cnt_ptr, s_m, s_b, src, b, kv, km, C,
                tl.load(lse_ptr + sb).to(ACC), tl.load(rlse_ptr + sb).to(ACC),
                tl.load(rmean_ptr + sb).to(ACC), tl.load(sample_ptr + src),
                1.0 / _pick(t_vec, sel), _pick(copy_vec, sel), root, a, one_minus_a,
                NOISE, ACC)
            bad_m = bad_m | bad
            x = tl.load(zs_row + ids * s_sc).to(ACC)
            row = sel[:, None]
            tw = tl.where(row, wt[None, :], tw)
            tlp = tl.where(row, tl.where(real, lp, 0.0)[None, :], tlp)
            xs_ids = tl.where(row, x[None, :], xs_ids)
            tid = tl.where(row, tl.where(real, ids, -1)[None, :], tid)
            lpr = tl.where(sel, lp_r, lpr)
    has_rest = lpr > float("-inf")
    # 2. student normalizers: T=1, every T_j, and the rest classes of every T_j
    m1 = zero + float("-inf")
    d1 = zero
    ms = tl.full([BLOCK_J], float("-inf"), ACC)
    ds = tl.zeros([BLOCK_J], ACC)
    mr = tl.full([BLOCK_J], float("-inf"), ACC)
    dr = tl.zeros([BLOCK_J], ACC)
    bad_s = tl.zeros([BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cm = cols < C
        x = tl.load(zs_row + cols * s_sc, mask=cm, other=0.0).to(ACC)
        bad_s = bad_s | ((x - x) != 0).to(tl.int32)
        m1, d1 = _online(m1, d1, tl.where(cm, x, float("-inf")))
        for j in range(J):
            sel = jv == j
            if _pick(w_vec, sel) != 0.0:
                xt = tl.where(cm, x / _pick(t_vec, sel), float("-inf"))
                msj, dsj = _online(_pick(ms, sel), _pick(ds, sel), xt)
                ms = tl.where(sel, msj, ms)
                ds = tl.where(sel, dsj, ds)
                if _pick(has_rest.to(tl.int32), sel) != 0:
                    ids_j = tl.sum(tl.where(sel[:, None], tid, 0), 0)
                    member = tl.sum((cols[:, None] == ids_j[None, :]).to(tl.int32), 1) > 0
                    mrj, drj = _online(_pick(mr, sel), _pick(dr, sel),
                                         tl.where(member, float("-inf"), xt))
                    mr = tl.where(sel, mrj, mr)
                    dr = tl.where(sel, drj, dr)
    ld1 = tl.log(d1)
    lse_s = ms + tl.log(tl.where(ds > 0, ds, 1.0))  # per term: student logsumexp at T_j
    logq_r = tl.where(has_rest, (mr - lse_s) + tl.log(tl.where(dr > 0, dr, 1.0)), 0.0)
    logq_ids = xs_ids / t_vec[:, None] - lse_s[:, None]
    kl = tl.sum(tl.where(tw > 0, tw * (tlp - logq_ids), 0.0), 1)
    kl += tl.where(has_rest, tl.exp(lpr) * (lpr - logq_r), 0.0)
    rest_scale = tl.where(has_rest, tl.exp(lpr - logq_r), 0.0)  # p_r / q_r
    # 3. gradient row: wce (softmax - onehot) + sum_j w_j T_j (q_j (1 - [rest] p_r/q_r)
    #    - target at the slots)
    if WRITE_GRAD:
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
                    q = tl.exp(x / T - _pick(lse_s, sel))
                    ids_j = tl.sum(tl.where(sel[:, None], tid, 0), 0)
                    tw_j = tl.sum(tl.where(sel[:, None], tw, 0.0), 0)
                    hit = cols[:, None] == ids_j[None, :]
                    target = tl.sum(tl.where(hit, tw_j[None, :], 0.0), 1)
                    member = tl.sum(hit.to(tl.int32), 1) > 0
                    rs = tl.where(member, 0.0, _pick(rest_scale, sel))
                    g = g + (w * T) * (q * (1.0 - rs) - target)
            tl.store(grad_ptr + b * s_gb + cols, (g * inv_B).to(grad_ptr.dtype.element_ty),
                     mask=cm)
    zy = tl.load(zs_row + tl.where(y_ok, y, 0) * s_sc).to(ACC)
    loss = wce * ((m1 - zy) + ld1) + tl.sum(w_vec * t_vec * t_vec * kl, 0)
    tl.store(loss_ptr + b, (loss * inv_B).to(loss_ptr.dtype.element_ty))
    flag = tl.max(bad_s, 0) + 2 * bad_m + tl.where(y_ok, 0, 4)
    tl.atomic_or(flag_ptr, flag, mask=flag != 0)


def sparse_distill(zs: torch.Tensor, sm: SparseMentors, y: torch.Tensor, src, copy, w, t,
                   wce, flag, *, noise=None, write_grad=True, block_c: int | None = None):
    """Launch the sparse kernel; arguments as `distill.fused_distill` with the mentors as
    `SparseMentors`. Returns (loss_rows [B] / B, grad [B, C] or None)."""
    B, C = zs.shape
    M, _, K = sm.shape
    J = int(src.numel()) if w.numel() else 0
    dev = zs.device
    loss_rows = torch.empty(B, device=dev, dtype=torch.float64 if zs.dtype == torch.float64
                            else torch.float32)
    grad = torch.empty_like(zs, memory_format=torch.contiguous_format) if write_grad else None
    ids, vals, cnt = (x.contiguous() for x in (sm.ids, sm.logits, sm.counts))
    stats = torch.stack([sm.lse.float(), sm.rest_lse.float(), sm.rest_mean.float()])
    is_sample = _const(tuple(int(m == "sample") for m in sm.modes), torch.int32, dev)
    root, a = 0, 0.0
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    if noise is not None:
        seed, step, a = noise
        root = as_i32(stream_key(STREAM_TEKAP, int(seed), int(step)))
    block_k = triton.next_power_of_2(max(K, 1))
    blk = min(triton.next_power_of_2(C), max(16, MAX_BLOCK_ELEMS // block_k))
    if block_c is not None:
        blk = triton.next_power_of_2(block_c)
    launch.run(_sparse_kernel, (B,), (
        zs, zs.stride(0), zs.stride(1), ids, vals, cnt, ids.stride(0), ids.stride(1),
        stats[0], stats[1], stats[2], stats.stride(1), stats.stride(2), is_sample, y,
        src, copy, w, w.stride(0), w.stride(1), t, t.stride(0), t.stride(1), wce,
        wce.stride(0), grad if write_grad else loss_rows, C if write_grad else 0,
        loss_rows, flag, C, K, J, _const((1.0 / B, float(a), 1.0 - float(a)), acc, dev), root),
        dict(BLOCK_C=blk, BLOCK_K=block_k, BLOCK_J=triton.next_power_of_2(max(J, 1)),
             NOISE=noise is not None,
             ACC=tl.float64 if zs.dtype == torch.float64 else tl.float32,
             WRITE_GRAD=write_grad, num_warps=4))
    return loss_rows, grad


_CONST: dict[tuple, torch.Tensor] = {}


def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor built once per (values, device): no host copy per step."""
    key = (values, dtype, str(device))
    if key not in _CONST:
        _CONST[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONST[key]


class _SparseFn(torch.autograd.Function):
    """forward(student, launch) -> (loss, flags); the gradient is computed by the kernel in
    the forward, the backward only scales it."""

    @staticmethod
    def forward(ctx, student, launch):
        rows, grad, flags = launch()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(flags)
        return rows.sum(), flags

    @staticmethod
    def backward(ctx, grad_loss, _grad_flags):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None


def sparse_fused_loss(zs: torch.Tensor, sm: SparseMentors, y: torch.Tensor,
                      table: TermTable, *, seed: int = 0, step: int = 0,
                      rank_logits: torch.Tensor | None = None, block_c: int | None = None):
    """The loss of a term table on sparse mentors, fused; returns DistillOutput. A Ranking
    runs on the device from the student's CE and the mentors' stored true-class log-probs
    (`reference.classroom_weights`); a RandomDrop's keep mask comes from (seed, step) on the
    host (ints: no device counters here)."""
    if not isinstance(table, TermTable):
        raise ValueError("sparse mentors run term tables only (a decoupled loss needs every "
                         "class): use a dense cache")
    dev = zs.device
    B, _ = zs.shape
    M = sm.shape[0]
    table.check(M)
    f32 = torch.float32
    acc = torch.float64 if zs.dtype == torch.float64 else f32  # the table's constants in it
    write_grad = zs.requires_grad and torch.is_grad_enabled()
    flag = torch.zeros((), dtype=torch.int32, device=dev)
    sel = table.select
    src, copy = tuple(table.src), tuple(table.copies)
    if isinstance(sel, Ranking):
        with torch.no_grad():
            rank_zs = zs if rank_logits is None else rank_logits
            ce = torch.cat([ref.ce_rows(rank_zs.detach(), y.long())[None].float(),
                            -sm.true_logp.float()])
            flag |= (~torch.isfinite(sm.true_logp)).any().to(torch.int32) * 2
            cw = ref.classroom_weights(
                ce, tau=sel.tau, beta=sel.beta, delta=sel.delta, lam=sel.lam,
                variant="official" if sel.official else "paper",
                granularity="sample" if sel.per_sample else "batch")
        w, t, wce = cw["w_kl"].float(), cw["temp"].float(), cw["w_ce"].float()
        stats = ref.classroom_stats(cw, flag)
        if sel.delta_term:  # delta * L_distill(teacher; T=1)
            w = torch.cat([w.to(acc), torch.full((1, B), float(sel.delta), dtype=acc,
                                                 device=dev)])
            t = torch.cat([t, torch.ones(1, B, device=dev)])
        stats.pop("nonfinite")
    else:
        weights, temps, rank_stats = table.weight, table.temp, table.static_stats(M)
        if isinstance(sel, RandomDrop):
            keep = dgkd_keep_mask(int(seed), int(step), M, sel.p)
            kept = [j for j in range(len(src)) if keep[src[j]]]
            src, copy = tuple(src[j] for j in kept), tuple(copy[j] for j in kept)
            weights, temps = (1.0 / len(kept),) * len(kept), (sel.tau,) * len(kept)
            act = [1.0 if k else 0.0 for k in keep]
            rank_stats = ([a / len(kept) for a in act], act,
                          [sel.tau if k else 1.0 for k in keep], 1.0)
        n = len(src)
        w = _const(tuple(float(v) for v in weights), acc, dev).view(-1, 1).expand(n, B)
        t = _const(tuple(float(v) for v in temps), acc, dev).view(-1, 1).expand(n, B)
        wce = _const((float(table.w_ce),), acc, dev).expand(B)
        rank, active, temp, student = rank_stats
        stats = {"mentor_rank": _const(tuple(float(v) for v in rank), f32, dev),
                 "mentor_active": _const(tuple(float(v) for v in active), f32, dev),
                 "mentor_temp": _const(tuple(float(v) for v in temp), f32, dev),
                 "student_rank": _const(float(student), f32, dev)}
    src_t = _const(src or (0,), torch.int32, dev)
    copy_t = _const(copy or (-1,), torch.int32, dev)
    noise = (seed, step, table.noise_a) if table.noisy else None

    def launch():
        rows, grad = sparse_distill(zs.detach(), sm, y, src_t, copy_t, w, t, wce, flag,
                                    noise=noise, write_grad=write_grad, block_c=block_c)
        return rows, grad, flag

    loss, flags = _SparseFn.apply(zs, launch)
    return DistillOutput(loss, {**stats, "nonfinite": flags})

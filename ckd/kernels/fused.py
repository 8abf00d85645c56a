"""Fused path of `distill_loss`: each method as a term table for `distill.py`, the launch
plan and the thin autograd.Function (gradient computed in the forward, backward scales it).

Launches per loss forward+backward: the loss kernel (+ the batch-ranking kernel for
ClassroomKD at batch granularity) and one backward kernel that touches no memory when
the upstream gradient is 1: at most 3, with no host sync and no fill kernels (outputs
are written by the kernels' last program, tickets reset themselves). Constant tables
and stats are built once per (values, device) and cached (a CPU -> CUDA copy from
pageable memory would block the host every step): treat cached stats as read-only.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ckd.kernels import distill as D
from ckd.kernels.output import DistillOutput
from ckd.kernels.rank import _rank_batch_kernel
from ckd.kernels.rng import as_i32
from ckd.row_stats import mentor_row_stats

_CONST: dict[tuple, Tensor] = {}
_TICKETS: dict[str, Tensor] = {}
TICKET_RANK, TICKET_LOSS, TICKET_SCALE = 0, 1, 2


def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (values, dtype, str(device))
    if key not in _CONST:
        _CONST[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONST[key]


def _tickets(device: torch.device) -> Tensor:
    """Per-device int32 tickets of the last-program reductions (zero between launches)."""
    key = str(device)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(8, dtype=torch.int32, device=device)
    return _TICKETS[key]


def run(kernel, grid, args, kwargs) -> None:
    """Every launch goes through here (tests record the calls)."""
    kernel[grid](*args, **kwargs)


def vec_width(t: Tensor, C: int) -> int:
    """Elements per 128-bit load for rows of `t` (last dim C), or 1 when the rows are not
    16-byte aligned or the last row's padded group would leave the storage."""
    v = 16 // t.element_size()
    if v == 1 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return 1
    if any(s % v for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True) if n > 1):
        return 1
    last = t.storage_offset() + sum((n - 1) * s for n, s in
                                    zip(t.shape[:-1], t.stride()[:-1], strict=True))
    if (last + triton.cdiv(C, v) * v) * t.element_size() > t.untyped_storage().nbytes():
        return 1
    return v


def _tiles(B: int, C: int, n_terms: int, block_c: int | None, extra_term: bool = False):
    """(ROWS, BLOCK_C, ONE_BLOCK, num_warps): whole rows in registers up to MAX_BLOCK_C
    (several rows per program for small C), else class blocks of 1024."""
    bt = triton.next_power_of_2(max(n_terms, 1))
    if block_c is None and C <= D.MAX_BLOCK_C:
        bc = max(16, triton.next_power_of_2(C))
        rows = max(1, min(D.ROW_TILE // bc, triton.next_power_of_2(B)))
        one = True
    else:
        bc = triton.next_power_of_2(block_c or min(D.MAX_BLOCK_C, 1024))
        rows, one = 1, False
    # <= 8 elements of a row tile per thread (4 warps per 1024), and <= 32 term elements
    # (sm_90 ptxas: <= 128 registers, no spills at C = 100 and 1000; tests compile them)
    tile = rows * bc
    warps = max(tile // 256, (bt * tile) // (512 if bt <= 4 else 1024), 1)
    if extra_term:
        warps *= 2
    return rows, bc, one, min(16, triton.next_power_of_2(warps))


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


class FusedDistillFn(torch.autograd.Function):
    """forward(student, launch) -> (loss, flags); `launch()` runs the forward kernels and
    returns (loss, flags, grad | None, scale state, in_place)."""

    @staticmethod
    def forward(ctx, student: Tensor, launch):
        loss, flags, grad, state, in_place = launch()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(flags)
        ctx.save_for_backward(grad, state)
        ctx.in_place, ctx.student_dtype = in_place, student.dtype
        return loss, flags

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, _grad_flags):
        if grad_loss is None:
            return None, None
        grad, state = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("distill_loss ran without a gradient (no_grad or a student "
                               "that does not require grad): recompute it with grad enabled")
        out = grad if ctx.in_place else torch.empty_like(grad, dtype=ctx.student_dtype)
        block = 4096
        run(D._scale_kernel, (triton.cdiv(grad.numel(), block),),
            (grad, out, grad_loss, state, _tickets(grad.device)[TICKET_SCALE:], grad.numel()),
            dict(IN_PLACE=ctx.in_place, BLOCK=block, num_warps=8))
        return out, None


def _step_args(step):
    """(step value, step pointer, STEP_FROM_PTR) for an int or a device tensor step."""
    if isinstance(step, Tensor):
        return 0, step, True
    return as_i32(step), None, False


def fused_loss(zs: Tensor, zm: Tensor | None, y: Tensor, method: str, p: dict, *,
               tau: float, beta: float, delta: float, lam: float | None, variant: str,
               granularity: str, block_c: int | None = None,
               mentor_stats: Tensor | None = None):
    """The fused counterpart of `reference.REFERENCE[method]`; returns DistillOutput."""
    dev = zs.device
    B, C = zs.shape
    M = 0 if zm is None else zm.shape[0]
    f32 = torch.float32
    # parameters a method does not declare come as None (unused by its kernel path)
    tau = 1.0 if tau is None else tau
    beta = 1.0 if beta is None else beta
    delta = 0.0 if delta is None else delta
    write_grad = zs.requires_grad and torch.is_grad_enabled()
    loss_dtype = torch.float64 if zs.dtype == torch.float64 else f32
    in_place = zs.dtype != torch.float16  # fp16: the gradient stays fp32 until scaled
    grad_dtype = f32 if zs.dtype == torch.float16 else zs.dtype
    zs_d = zs.detach()
    loss = torch.empty((), dtype=loss_dtype, device=dev)
    flags = torch.empty((), dtype=torch.int32, device=dev)
    state = torch.empty((), dtype=loss_dtype, device=dev)
    grad = torch.empty((B, C), dtype=grad_dtype, device=dev) if write_grad else None
    tickets = _tickets(dev)
    acc = _acc(zs.dtype)
    vec_s = vec_width(zs_d, C)
    vec_g = vec_width(grad, C) if write_grad else 1
    one_hot = [1.0] + [0.0] * (M - 1)
    seed32 = as_i32(0 if p.get("seed") is None else p["seed"])
    step_val, step_ptr, step_from_ptr = _step_args(0 if p.get("step") is None else p["step"])

    if method == "dkd":
        zt = zm[0]
        rows, bc, one, warps = _tiles(B, C, 1, block_c)
        nprog = triton.cdiv(B, rows)
        part = torch.empty(nprog, 4, dtype=loss_dtype, device=dev)
        rank_out = torch.empty(M, dtype=f32, device=dev)
        epoch = p.get("epoch")
        warm = 1.0 if epoch is None or isinstance(epoch, Tensor) else \
            min(float(epoch) / p["warmup"], 1.0)

        def launch():
            run(D._dkd_kernel, (nprog,), (
                zs_d, zs_d.stride(0), zs_d.stride(1), zt, zt.stride(0), zt.stride(1), y,
                y.stride(0), grad if write_grad else loss, part, tickets[TICKET_LOSS:],
                loss, flags, rank_out, state, B, C, 1.0 / B, float(p["T"]),
                float(p["alpha_ce"]), float(p["dkd_alpha"]), float(p["dkd_beta"]), warm,
                epoch if isinstance(epoch, Tensor) else loss, float(p["warmup"])),
                dict(EPOCH_FROM_PTR=isinstance(epoch, Tensor), BLOCK_M=triton.next_power_of_2(M),
                     M=M, ROWS=rows, BLOCK_C=bc, ONE_BLOCK=one, VEC_S=vec_s,
                     VEC_M=vec_width(zt, C), VEC_G=vec_g, ACC=acc, WRITE_GRAD=write_grad,
                     NV=4, num_warps=warps))
            return loss, flags, grad, state, in_place

        stats = {"mentor_rank": rank_out,
                 "mentor_active": _const(tuple(one_hot), f32, dev),
                 "mentor_temp": _const(tuple([float(p["T"])] + [1.0] * (M - 1)), f32, dev),
                 "student_rank": _const(float(p["alpha_ce"]), f32, dev)}
        out, flags_out = FusedDistillFn.apply(zs, launch)
        return DistillOutput(out, {**stats, "nonfinite": flags_out})

    # ---- term methods
    mode, table, noise_a, n_terms, n_mentors, official = D.MODE_TABLE, None, 0.0, M, M, False
    delta_term = False
    thr = 0
    stats_from_kernel = False
    if method == "nokd":
        n_terms = n_mentors = 0
        table = ([], [], 1.0)
        st = ([0.0] * M, [0.0] * M, [1.0] * M, 1.0)
    elif method == "kd":
        n_terms = n_mentors = 1
        table = ([p["alpha_kd"]], [p["T"]], p["alpha_ce"])
        st = ([p["alpha_kd"]] + [0.0] * (M - 1), one_hot, [p["T"]] + [1.0] * (M - 1),
              p["alpha_ce"])
    elif method == "aver":
        table = ([1.0] * M, [tau] * M, 1.0)
        st = ([1.0] * M, [1.0] * M, [tau] * M, 1.0)
    elif method == "dgkd":
        mode, stats_from_kernel = D.MODE_DGKD, True
        if not 0.0 <= p["p"] <= 1.0:
            raise ValueError(f"dgkd drop probability p must be in [0, 1], got {p['p']}")
        thr = int(p["p"] * 2.0**32)
    elif method == "tekap":
        n = int(p["n_copies"])
        n_terms, n_mentors, noise_a = n + 1, 1, float(p["a"])
        table = ([p["lam_clean"]] + [p["lam_noisy"]] * n, [p["T"]] * (n + 1), p["alpha_ce"])
        st = ([p["lam_clean"] + n * p["lam_noisy"]] + [0.0] * (M - 1), one_hot,
              [p["T"]] + [1.0] * (M - 1), p["alpha_ce"])
    elif method == "classroom":
        stats_from_kernel, official = True, variant == "official"
        delta_term = variant == "paper" and delta != 0.0
        n_terms = M + int(delta_term)
        mode = D.MODE_SAMPLE if granularity == "sample" else D.MODE_TABLE
    else:
        raise AssertionError(method)
    bt = triton.next_power_of_2(max(n_terms, 1))
    rows, bc, one, warps = _tiles(B, C, n_terms, block_c, n_terms > n_mentors > 1)
    vec_m = 1 if zm is None else vec_width(zm[:n_mentors], C)
    if one and rows > 1 and (vec_s == 1 or (zm is not None and vec_m == 1)):
        # unaligned rows (a bf16 student at C=100, contiguous fp16 mentors) load element by
        # element, which takes more registers per element: fewer rows per program (a
        # quarter with sample-granularity selection, which keeps more per row)
        rows = max(1, rows // (4 if mode == D.MODE_SAMPLE else 2))
    nprog = triton.cdiv(B, rows)
    nv = triton.next_power_of_2(5 + 3 * bt)
    part = torch.empty(nprog, nv, dtype=loss_dtype, device=dev)
    out = torch.empty(3 * M + 1, dtype=f32, device=dev) if stats_from_kernel else None
    zm_arg = zs_d if zm is None else zm
    zm_strides = (0, 0, 0) if zm is None else zm.stride()
    rank_zs = zs_d if p.get("rank_logits") is None else p["rank_logits"].detach()
    mstats = None
    if method == "classroom":
        mstats = mentor_stats if mentor_stats is not None else mentor_row_stats(zm, y)
    if table is not None:
        w, t, wce = table
        pad = bt - len(w)
        table_t = _const(tuple(float(v) for v in [*w, *[0.0] * pad, *t, *[1.0] * pad, wce]),
                         f32, dev)
    else:
        table_t = torch.empty(2 * bt + 1, dtype=f32, device=dev)
    st_arg = (mstats, mstats.stride(0), mstats.stride(1)) if mstats is not None else \
        (loss, 0, 0)
    lam_v = float(M if lam is None else lam)

    def launch():
        if method == "classroom" and mode == D.MODE_TABLE:  # batch ranking first
            r_rows, r_bc, r_one, r_warps = _tiles(B, C, 1, block_c)
            r_nprog = triton.cdiv(B, r_rows)
            r_part = torch.empty(r_nprog, 2 * bt, dtype=f32, device=dev)
            run(_rank_batch_kernel, (r_nprog,), (
                rank_zs, rank_zs.stride(0), rank_zs.stride(1), y, y.stride(0), *st_arg,
                table_t, out, r_part, tickets[TICKET_RANK:], B, C, lam_v, float(tau),
                float(beta), float(delta)),
                dict(NM=M, BLOCK_T=bt, OFFICIAL=official, DELTA_TERM=delta_term, ROWS=r_rows,
                     BLOCK_C=r_bc, ONE_BLOCK=r_one, VEC=vec_width(rank_zs, C), ACC=acc,
                     NV=2 * bt, num_warps=r_warps, **D.SELECTION_OPTIONS))
        run(D._terms_kernel, (nprog,), (
            zs_d, zs_d.stride(0), zs_d.stride(1), rank_zs, rank_zs.stride(0), rank_zs.stride(1),
            zm_arg, *zm_strides, y, y.stride(0), *st_arg, table_t,
            grad if write_grad else loss, part, tickets[TICKET_LOSS:], loss, flags,
            out if out is not None else loss, state, B, C, 1.0 / B, seed32, step_val,
            step_ptr if step_ptr is not None else y, float(tau), float(beta), float(delta),
            lam_v, noise_a),
            dict(NM=n_mentors, NT=n_terms, BLOCK_T=bt, MODE=mode, NOISE=method == "tekap",
                 DELTA_TERM=delta_term, OFFICIAL=official, DROP_THRESHOLD=thr,
                 STEP_FROM_PTR=step_from_ptr, RANK_SEPARATE=rank_zs is not zs_d, ROWS=rows,
                 BLOCK_C=bc, ONE_BLOCK=one, VEC_S=vec_s, VEC_M=vec_m, VEC_G=vec_g, ACC=acc,
                 WRITE_GRAD=write_grad, NV=nv, num_warps=warps,
                 **(D.SELECTION_OPTIONS if mode == D.MODE_SAMPLE else {})))
        return loss, flags, grad, state, in_place

    if stats_from_kernel:
        stats = {"mentor_rank": out[:M], "mentor_active": out[M:2 * M],
                 "mentor_temp": out[2 * M:3 * M], "student_rank": out[3 * M]}
    else:
        rank, active, temp, student = st
        stats = {"mentor_rank": _const(tuple(float(v) for v in rank), f32, dev),
                 "mentor_active": _const(tuple(float(v) for v in active), f32, dev),
                 "mentor_temp": _const(tuple(float(v) for v in temp), f32, dev),
                 "student_rank": _const(float(student), f32, dev)}
    loss_out, flags_out = FusedDistillFn.apply(zs, launch)
    return DistillOutput(loss_out, {**stats, "nonfinite": flags_out})

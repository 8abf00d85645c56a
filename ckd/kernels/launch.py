"""Fused loss of a term table (terms.py) on dense mentors: the launch plan for `triton_kernels.py`
and the thin autograd.Function (gradient computed in the forward, backward scales it).

Launches per loss forward+backward: the loss kernel (+ the batch-ranking kernel for
ClassroomKD at batch granularity) and one backward kernel that touches no memory when
the upstream gradient is 1: at most 3, with no host sync and no fill kernels (outputs
are written by the kernels' last program, tickets reset themselves). Constant tables
and stats are built once per (values, device) and cached (a CPU -> CUDA copy from
pageable memory would block the host every step): treat cached stats as read-only.
Host cost: the launch plan of a table (tiles, grid, constexpr arguments, the table's
tensors, scratch buffers) is built once per (table, shapes, dtypes, alignments, device)
and cached (`_plan`), so a step costs a dict lookup, the output allocations and the
autograd.Function (benchmarks/host.py measures it against F.cross_entropy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from ckd.kernels import triton_kernels as D
from ckd.kernels.dkd import _dkd_kernel
from ckd.kernels.output import DistillOutput
from ckd.kernels.rank import _rank_batch_kernel
from ckd.kernels.rng import as_i32
from ckd.kernels.split_rows import ROW_SCALARS, _split_kernel, block_s, split_plan
from ckd.kernels.terms import Decoupled, RandomDrop, Ranking, TermTable
from ckd.mentor_stats import mentor_row_stats

_CONST: dict[tuple, Tensor] = {}
_TICKETS: dict[str, Tensor] = {}
TICKET_RANK, TICKET_LOSS, TICKET_SCALE = 0, 1, 2
# class-blocked rows (C > MAX_BLOCK_C) are split across programs until a launch has this
# many (H200: 132 SMs; a few resident programs each, several waves): split_rows.py
SPLIT_TARGET_PROGRAMS = 4096


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


def _cdiv(a: int, b: int) -> int:
    """Ceil division in Python (triton.cdiv is a JIT function: ~5 us a host call)."""
    return -(-a // b)


def run(kernel, grid, args, kwargs) -> None:
    """Every launch goes through here (tests record the calls)."""
    kernel[grid](*args, **kwargs)


def vec_width(t: Tensor, C: int) -> int:
    """Elements per 128-bit load for rows of `t` (last dim C), or 1 when the rows are not
    16-byte aligned or the last row's padded group would leave the storage."""
    size = t.element_size()
    v = 16 // size
    if v == 1 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return 1
    if C % v == 0 and t.is_contiguous():  # whole groups, every row inside the storage
        return v
    last = t.storage_offset()
    for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if n > 1:
            if s % v:
                return 1
            last += (n - 1) * s
    if (last + _cdiv(C, v) * v) * size > t.untyped_storage().nbytes():
        return 1
    return v


@functools.lru_cache(maxsize=1024)
def _tiles(B: int, C: int, n_terms: int, block_c: int | None, extra_term: bool = False,
           row_div: int = 1):
    """(ROWS, BLOCK_C, ONE_BLOCK, num_warps): whole rows in registers up to MAX_BLOCK_C
    (several rows per program for small C, `row_div` times fewer for rows loaded element
    by element), else class blocks of 1024."""
    bt = triton.next_power_of_2(max(n_terms, 1))
    if block_c is None and C <= D.MAX_BLOCK_C:
        bc = max(16, triton.next_power_of_2(C))
        full = max(1, min(D.ROW_TILE // bc, triton.next_power_of_2(B)))
        rows, one = max(1, full // row_div), True
    else:
        bc = triton.next_power_of_2(block_c or min(D.MAX_BLOCK_C, 1024))
        full, rows, one = 1, 1, False
    # <= 8 elements of a row tile per thread (4 warps per 1024), and <= 32 term elements
    # (sm_90 ptxas: <= 128 registers, no spills at C = 100 and 1000; tests compile them),
    # counted on the full tile: element-by-element loads keep more per element. An extra
    # term (ClassroomKD's delta) doubles the warps of the final tile: doubling the full
    # tile's gave a quarter of the rows 16 warps, where ptxas kept 64 registers a thread
    # and spilled.
    warps = _warps(full * bc, bt)
    if extra_term:
        warps = max(warps, 2 * _warps(rows * bc, bt))
    return rows, bc, one, min(16, triton.next_power_of_2(warps))


def _warps(tile: int, bt: int) -> int:
    return max(tile // 256, (bt * tile) // (512 if bt <= 4 else 1024), 1)


def _acc(dtype: torch.dtype):
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
        run(D._scale_kernel, (_cdiv(grad.numel(), block),),
            (grad, out, grad_loss, state, _tickets(grad.device)[TICKET_SCALE:], grad.numel()),
            dict(IN_PLACE=ctx.in_place, BLOCK=block, num_warps=8))
        return out, None


def _step_args(step):
    """(step value, step pointer, STEP_FROM_PTR) for an int or a device tensor step."""
    if isinstance(step, Tensor):
        return 0, step, True
    return as_i32(step), None, False


def _stats_consts(rank, active, temp, student, dev) -> dict[str, Tensor]:
    f32 = torch.float32
    return {"mentor_rank": _const(tuple(float(v) for v in rank), f32, dev),
            "mentor_active": _const(tuple(float(v) for v in active), f32, dev),
            "mentor_temp": _const(tuple(float(v) for v in temp), f32, dev),
            "student_rank": _const(float(student), f32, dev)}


@dataclass(frozen=True)
class _Plan:
    """Everything about a term-table launch that does not change from step to step."""

    terms: tuple  # (grid, constexpr kwargs) of the loss kernel
    rank: tuple | None  # (grid, constexpr kwargs, partial width) of the batch ranking
    scalars: tuple  # (tau, beta, delta, lam) arguments (the selection's, fp32)
    consts: Tensor  # (1 / B, noise_a) in the accumulation dtype
    nprog: int
    nv: int
    bt: int
    src: Tensor  # the table's source mentors and noise copies, int32 [2 * BLOCK_T]
    weights: Tensor | None  # [w | T | w_ce] of a table without selection
    stats: dict[str, Tensor] | None  # logged stats of a table without selection
    split: tuple | None = None  # (SPLIT, row partial width) of the split-rows kernel
    # scratch buffers written and read within one forward (partial sums, the ranking's
    # table): allocated once per plan; launches on one stream run in order
    scratch: dict[str, Tensor] = field(default_factory=dict)

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype, device,
               zeros: bool = False) -> Tensor:
        """`zeros`: tickets, zeroed once here and reset by the kernels that take them."""
        buf = self.scratch.get(name)
        if buf is None:
            make = torch.zeros if zeros else torch.empty
            buf = self.scratch[name] = make(shape, dtype=dtype, device=device)
        return buf


_PLANS: dict[tuple, _Plan] = {}


def _src_prefix(src: tuple[int, ...]) -> int:
    """k when term j reads mentor j for j < k and the teacher after (every built-in
    method's layout: the kernel then needs no table load), else -1."""
    k = 0
    while k < len(src) and src[k] == k:
        k += 1
    return k if all(s == 0 for s in src[k:]) else -1


def _plan(table: TermTable, B: int, C: int, M: int, zs: Tensor, zm: Tensor | None,
          vecs: tuple[int, int, int, int], write_grad: bool, step_from_ptr: bool,
          rank_separate: bool, block_c: int | None, split_chunk: int | None) -> _Plan:
    """The launch plan of a table at these shapes, dtypes and alignments, built once per
    key (the host cost of a step is then a dict lookup and the allocations)."""
    key = (table, B, C, M, zs.dtype, None if zm is None else zm.dtype, vecs, write_grad,
           step_from_ptr, rank_separate, block_c, split_chunk, str(zs.device))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    dev = zs.device
    vec_s, vec_m, vec_g, vec_r = vecs
    sel = table.select
    n_terms = len(table.src)
    n_mentors = max(table.src, default=-1) + 1  # mentors read: 0..n_mentors-1
    mode, thr, official, delta_term = D.MODE_TABLE, 0, False, False
    tau = beta = lam = 1.0
    delta = 0.0
    if isinstance(sel, Ranking):
        mode = D.MODE_SAMPLE if sel.per_sample else D.MODE_TABLE
        official, delta_term = sel.official, sel.delta_term
        tau, beta, delta, lam = sel.tau, sel.beta, sel.delta, sel.lam
        n_mentors = M
    elif isinstance(sel, RandomDrop):
        mode, thr, tau = D.MODE_DGKD, sel.threshold(), sel.tau
    bt = triton.next_power_of_2(max(n_terms, 1))
    # unaligned rows (a bf16 student at C=100, contiguous fp16 mentors) load element by
    # element, which takes more registers per element: fewer rows per program (a quarter
    # with sample-granularity selection, which keeps more per row)
    unaligned = vec_s == 1 or (zm is not None and vec_m == 1)
    rows, bc, one, warps = _tiles(B, C, n_terms, block_c, n_terms > n_mentors > 1,
                                  (4 if mode == D.MODE_SAMPLE else 2) if unaligned else 1)
    nprog = _cdiv(B, rows)
    nv = triton.next_power_of_2(5 + 3 * bt)
    acc = _acc(zs.dtype)
    acc_dtype = torch.float64 if zs.dtype == torch.float64 else torch.float32
    terms_kw = dict(NM=n_mentors, NT=n_terms, BLOCK_T=bt, MODE=mode, NOISE=table.noisy,
                    SRC_PREFIX=_src_prefix(table.src),
                    COPY_FROM_TABLE=table.noisy and table.copies != tuple(range(-1, n_terms - 1)),
                    DELTA_TERM=delta_term, OFFICIAL=official, DROP_THRESHOLD=thr,
                    STEP_FROM_PTR=step_from_ptr, RANK_SEPARATE=rank_separate, ROWS=rows,
                    BLOCK_C=bc, ONE_BLOCK=one, VEC_S=vec_s, VEC_M=vec_m, VEC_G=vec_g,
                    ACC=acc, WRITE_GRAD=write_grad, NV=nv, num_warps=warps,
                    **(D.SELECTION_OPTIONS if mode == D.MODE_SAMPLE else {}))
    split = None
    if (not one or split_chunk is not None) and mode != D.MODE_SAMPLE and not rank_separate:
        # long rows: split across programs, streamed once (split_rows.py)
        if split_chunk is not None and block_c is None:
            bc = min(1024, triton.next_power_of_2(split_chunk))
        n_split, chunk = split_plan(B, C, bc, split_chunk, SPLIT_TARGET_PROGRAMS)
        nprog, nv, nr = B * n_split, 4, ROW_SCALARS.value + 3 * bt
        if table.noisy:  # the in-kernel noise of every term's tile: twice the threads
            warps = min(16, 2 * warps)
        terms_kw = dict(
            NT=n_terms, BLOCK_T=bt, MODE=mode, SRC_PREFIX=terms_kw["SRC_PREFIX"],
            COPY_FROM_TABLE=terms_kw["COPY_FROM_TABLE"], NOISE=table.noisy,
            DROP_THRESHOLD=thr, STEP_FROM_PTR=step_from_ptr, SPLIT=n_split,
            BLOCK_S=block_s(n_split), CHUNK=chunk, BLOCK_C=bc, VEC_S=vec_s, VEC_M=vec_m,
            VEC_G=vec_g, ACC=acc, WRITE_GRAD=write_grad, NR=nr, NV=nv, num_warps=warps)
        split = (n_split, nr)
    rank = None
    if isinstance(sel, Ranking) and mode == D.MODE_TABLE:  # batch ranking first
        r_rows, r_bc, r_one, r_warps = _tiles(B, C, 1, block_c)
        ext = sel.external_key  # [sums | counts] of the keyed rows (rank.py)
        rank = ((_cdiv(B, r_rows),), dict(
            NM=M, BLOCK_T=bt, OFFICIAL=official, DELTA_TERM=delta_term, ROWS=r_rows,
            BLOCK_C=r_bc, ONE_BLOCK=r_one, VEC=vec_r, ACC=acc, NV=(4 if ext else 2) * bt,
            EXT_KEY=ext, num_warps=r_warps, **D.SELECTION_OPTIONS), _cdiv(B, r_rows))
    pad = bt - n_terms
    src = _const(tuple(table.src) + (0,) * pad + tuple(table.copies) + (-1,) * pad,
                 torch.int32, dev)
    weights = stats = None
    if sel is None:
        weights = _const(tuple(float(v) for v in [*table.weight, *[0.0] * pad, *table.temp,
                                                  *[1.0] * pad, table.w_ce]), acc_dtype, dev)
        stats = _stats_consts(*table.static_stats(M), dev)
    plan = _Plan(((nprog,), terms_kw), rank,
                 (float(tau), float(beta), float(delta), float(lam)),
                 _const((1.0 / B, float(table.noise_a)), acc_dtype, dev), nprog, nv, bt, src,
                 weights, stats, split)
    _PLANS[key] = plan
    return plan


def fused_loss(zs: Tensor, zm: Tensor | None, y: Tensor, table: TermTable | Decoupled, *,
               seed: int = 0, step: int | Tensor = 0, epoch: int | Tensor | None = None,
               mentor_stats: Tensor | None = None, rank_logits: Tensor | None = None,
               block_c: int | None = None, split_chunk: int | None = None,
               rank_keys: Tensor | None = None) -> DistillOutput:
    """The loss of a term table (terms.py) on dense mentors [M, B, C], fused: returns
    DistillOutput. `seed`, `step` key the random draws (RandomDrop, TeKAP copies), `epoch`
    the Decoupled warm-up; `step`, `epoch` may be 0-dim device tensors. `mentor_stats`
    [M, B, 2] (`ckd.mentor_stats`) feed a Ranking; `rank_logits` rank instead of the student
    logits (a testing hook). `block_c` forces class blocks of that size, `split_chunk`
    rows split across programs of that many classes (split_rows.py; tests lower it to
    split small rows); `rank_keys` [1 + M, B] float32 are the scores of a Ranking with
    `external_key` (row 0 the student, NaN where a row has no key)."""
    if isinstance(table, Decoupled):
        return _decoupled_loss(zs, zm, y, table, epoch, block_c)
    dev = zs.device
    B, C = zs.shape
    M = 0 if zm is None else zm.shape[0]
    table.check(M)
    f32 = torch.float32
    write_grad = zs.requires_grad and torch.is_grad_enabled()
    loss_dtype = torch.float64 if zs.dtype == torch.float64 else f32
    in_place = zs.dtype != torch.float16  # fp16: the gradient stays fp32 until scaled
    zs_d = zs.detach()
    rank_zs = zs_d if rank_logits is None else rank_logits.detach()
    grad = torch.empty((B, C), dtype=f32 if zs.dtype == torch.float16 else zs.dtype,
                       device=dev) if write_grad else None
    n_read = max(table.src, default=-1) + 1
    vecs = (vec_width(zs_d, C), 1 if zm is None else vec_width(zm[:max(n_read, 1)], C),
            vec_width(grad, C) if write_grad else 1,
            vec_width(rank_zs, C) if isinstance(table.select, Ranking) else 1)
    step_val, step_ptr, step_from_ptr = _step_args(step)
    plan = _plan(table, B, C, M, zs, zm, vecs, write_grad, step_from_ptr,
                 rank_zs is not zs_d, block_c, split_chunk)
    ranking = isinstance(table.select, Ranking)
    loss = torch.empty((), dtype=loss_dtype, device=dev)
    flags = torch.empty((), dtype=torch.int32, device=dev)
    state = torch.empty((), dtype=loss_dtype, device=dev)
    part = plan.buffer("part", (plan.nprog, plan.nv), loss_dtype, dev)
    out = torch.empty(3 * M + 1, dtype=f32, device=dev) if plan.stats is None else None
    table_t = plan.weights if plan.weights is not None else \
        plan.buffer("table", (2 * plan.bt + 1,), f32, dev)
    zm_arg = zs_d if zm is None else zm
    zm_strides = (0, 0, 0) if zm is None else zm.stride()
    mstats = None
    if ranking and table.select.external_key:
        mstats = rank_keys
    elif ranking:
        mstats = mentor_stats if mentor_stats is not None else mentor_row_stats(zm, y)
    st_arg = (mstats, mstats.stride(0), mstats.stride(1)) if mstats is not None else \
        (loss, 0, 0)
    tickets = _tickets(dev)
    tau, beta, delta, lam = plan.scalars
    noise_a = float(table.noise_a)

    def launch():
        if plan.rank is not None:
            grid, kw, r_nprog = plan.rank
            r_part = plan.buffer("rank_part", (r_nprog, kw["NV"]), f32, dev)
            run(_rank_batch_kernel, grid, (
                rank_zs, rank_zs.stride(0), rank_zs.stride(1), y, y.stride(0), *st_arg,
                table_t, out, r_part, tickets[TICKET_RANK:], B, C, lam, tau, beta, delta), kw)
        grid, kw = plan.terms
        if plan.split is not None:
            n_split, nr = plan.split
            run(_split_kernel, grid, (
                zs_d, zs_d.stride(0), zs_d.stride(1), zm_arg, *zm_strides, y, y.stride(0),
                table_t, plan.src, grad if write_grad else loss,
                plan.buffer("rows", (B * n_split, nr), loss_dtype, dev),
                plan.buffer("row_tickets", (B,), torch.int32, dev, zeros=True), part,
                tickets[TICKET_LOSS:], loss, flags, out if out is not None else loss, state,
                B, C, 1.0 / B, noise_a, plan.consts, as_i32(seed), step_val,
                step_ptr if step_ptr is not None else y, tau), kw)
            return loss, flags, grad, state, in_place
        run(D._terms_kernel, grid, (
            zs_d, zs_d.stride(0), zs_d.stride(1), rank_zs, rank_zs.stride(0), rank_zs.stride(1),
            zm_arg, *zm_strides, y, y.stride(0), *st_arg, table_t, plan.src,
            grad if write_grad else loss, part, tickets[TICKET_LOSS:], loss, flags,
            out if out is not None else loss, state, B, C, 1.0 / B, noise_a, plan.consts,
            as_i32(seed), step_val, step_ptr if step_ptr is not None else y, tau, beta, delta,
            lam), kw)
        return loss, flags, grad, state, in_place

    if plan.stats is None:
        stats = {"mentor_rank": out[:M], "mentor_active": out[M:2 * M],
                 "mentor_temp": out[2 * M:3 * M], "student_rank": out[3 * M]}
    else:
        stats = plan.stats
    loss_out, flags_out = FusedDistillFn.apply(zs, launch)
    return DistillOutput(loss_out, {**stats, "nonfinite": flags_out})


def _decoupled_loss(zs, zm, y, table: Decoupled, epoch, block_c) -> DistillOutput:
    dev = zs.device
    B, C = zs.shape
    M = zm.shape[0]
    f32 = torch.float32
    write_grad = zs.requires_grad and torch.is_grad_enabled()
    loss_dtype = torch.float64 if zs.dtype == torch.float64 else f32
    in_place = zs.dtype != torch.float16
    zs_d = zs.detach()
    loss = torch.empty((), dtype=loss_dtype, device=dev)
    flags = torch.empty((), dtype=torch.int32, device=dev)
    state = torch.empty((), dtype=loss_dtype, device=dev)
    grad = torch.empty((B, C), dtype=f32 if zs.dtype == torch.float16 else zs.dtype,
                       device=dev) if write_grad else None
    zt = zm[0]
    rows, bc, one, warps = _tiles(B, C, 1, block_c)
    nprog = _cdiv(B, rows)
    part = torch.empty(nprog, 4, dtype=loss_dtype, device=dev)
    rank_out = torch.empty(M, dtype=f32, device=dev)
    warm = 1.0 if epoch is None or isinstance(epoch, Tensor) else \
        min(float(epoch) / table.warmup, 1.0)

    def launch():
        run(_dkd_kernel, (nprog,), (
            zs_d, zs_d.stride(0), zs_d.stride(1), zt, zt.stride(0), zt.stride(1), y,
            y.stride(0), grad if write_grad else loss, part, _tickets(dev)[TICKET_LOSS:],
            loss, flags, rank_out, state, B, C, 1.0 / B, float(table.T),
            float(table.alpha_ce), float(table.w_target), float(table.w_nontarget), warm,
            epoch if isinstance(epoch, Tensor) else loss, float(table.warmup)),
            dict(EPOCH_FROM_PTR=isinstance(epoch, Tensor), BLOCK_M=triton.next_power_of_2(M),
                 M=M, ROWS=rows, BLOCK_C=bc, ONE_BLOCK=one, VEC_S=vec_width(zs_d, C),
                 VEC_M=vec_width(zt, C), VEC_G=vec_width(grad, C) if write_grad else 1,
                 ACC=_acc(zs.dtype), WRITE_GRAD=write_grad, NV=4, num_warps=warps))
        return loss, flags, grad, state, in_place

    one_hot = [1.0] + [0.0] * (M - 1)
    stats = _stats_consts([0.0] * M, one_hot, [float(table.T)] + [1.0] * (M - 1),
                          table.alpha_ce, dev)
    stats["mentor_rank"] = rank_out
    out, flags_out = FusedDistillFn.apply(zs, launch)
    return DistillOutput(out, {**stats, "nonfinite": flags_out})

"""Fused path of `distill_loss`: each method as a term table for `distill.py`, and the thin
autograd.Function (gradient computed in the forward, backward only scales it).

Nothing here syncs with the host: per-method constants (weights, temperatures, term
tables, constant stats) are built once per (values, device) and cached, because a CPU
list -> CUDA tensor copy from pageable memory would block the host every step. Cached
stats tensors are shared: treat them as read-only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckd.kernels import distill as D
from ckd.kernels.output import DistillOutput
from ckd.kernels.rank import classroom_weights_fused
from ckd.kernels.rng import dgkd_keep_mask

_CONST: dict[tuple, Tensor] = {}


def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (values, dtype, str(device))
    if key not in _CONST:
        _CONST[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONST[key]


class FusedDistillFn(torch.autograd.Function):
    """forward(student, launch) -> (loss, flags); `launch()` runs the kernels and returns
    (loss_rows [B] already / B, grad [B, C] | None, flag [] int32)."""

    @staticmethod
    def forward(ctx, student: Tensor, launch):
        loss_rows, grad, flags = launch()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(flags)
        return loss_rows.sum(), flags

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_flags):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None


def _static_terms(method: str, M: int, B: int, p: dict, tau: float):
    """Term table of the methods whose weights do not depend on the logits.

    Returns (src, copy, weights, temps, w_ce, (rank, active, temp, student_rank))."""
    if method == "nokd":
        return [], [], [], [], 1.0, ([0.0] * M, [0.0] * M, [1.0] * M, 1.0)
    one_hot = [1.0] + [0.0] * (M - 1)
    temp_1h = [p.get("T", tau)] + [1.0] * (M - 1)
    if method == "kd":
        return ([0], [-1], [p["alpha_kd"]], [p["T"]], p["alpha_ce"],
                ([p["alpha_kd"]] + [0.0] * (M - 1), one_hot, temp_1h, p["alpha_ce"]))
    if method == "aver":
        return (list(range(M)), [-1] * M, [1.0] * M, [tau] * M, 1.0,
                ([1.0] * M, [1.0] * M, [tau] * M, 1.0))
    if method == "dgkd":
        keep = dgkd_keep_mask(p["seed"], p["step"], M, p["p"])
        kept = [m for m in range(M) if keep[m]]
        act = [1.0 if k else 0.0 for k in keep]
        return (kept, [-1] * len(kept), [1.0 / len(kept)] * len(kept), [tau] * len(kept),
                1.0, ([a / len(kept) for a in act], act,
                      [tau if k else 1.0 for k in keep], 1.0))
    if method == "tekap":
        n = int(p["n_copies"])
        weight = p["lam_clean"] + n * p["lam_noisy"]
        return ([0] * (n + 1), [-1] + list(range(n)),
                [p["lam_clean"]] + [p["lam_noisy"]] * n, [p["T"]] * (n + 1), p["alpha_ce"],
                ([weight] + [0.0] * (M - 1), one_hot, temp_1h, p["alpha_ce"]))
    raise AssertionError(method)


def _stats_const(M, rank, active, temp, student, dev) -> dict[str, Tensor]:
    f32 = torch.float32
    return {"mentor_rank": _const(tuple(rank), f32, dev),
            "mentor_active": _const(tuple(active), f32, dev),
            "mentor_temp": _const(tuple(temp), f32, dev),
            "student_rank": _const(float(student), f32, dev)}


def fused_loss(zs: Tensor, zm: Tensor | None, y: Tensor, method: str, p: dict, *,
               tau: float, beta: float, delta: float, lam: float | None, variant: str,
               granularity: str, block_c: int | None = None):
    """The fused counterpart of `reference.REFERENCE[method]`; returns DistillOutput.
    ClassroomKD: `_gt_ce_kernel` (CE per model and sample), `_rank_kernel` (selection,
    one program), then the main kernel: three launches, no host sync."""
    dev = zs.device
    B, C = zs.shape
    M = 0 if zm is None else zm.shape[0]
    write_grad = zs.requires_grad and torch.is_grad_enabled()
    flag = D.new_flag(dev)  # one word: every kernel of this call ORs its bits into it
    if method == "dkd":
        warm = 1.0 if p["epoch"] is None else min(p["epoch"] / p["warmup"], 1.0)

        def launch():
            rows, grad = D.fused_dkd(zs.detach(), zm[0], y, flag, T=p["T"],
                                     alpha_ce=p["alpha_ce"], w_tckd=warm * p["dkd_alpha"],
                                     w_nckd=warm * p["dkd_beta"], write_grad=write_grad,
                                     block_c=block_c)
            return rows, grad, flag

        one_hot = [1.0] + [0.0] * (M - 1)
        stats = _stats_const(M, [warm * v for v in one_hot], one_hot,
                             [p["T"]] + [1.0] * (M - 1), p["alpha_ce"], dev)
    else:
        if method == "classroom":
            with torch.no_grad():
                rank_zs = zs if p.get("rank_logits") is None else p["rank_logits"]
                ce = D.gt_ce(rank_zs.detach(), zm, y, flag, block_c)
                w, t, wce, stats = classroom_weights_fused(
                    ce, tau=tau, beta=beta, delta=delta, lam=lam, variant=variant,
                    granularity=granularity)
            src, copy = tuple(range(M)), (-1,) * M
            if variant == "paper" and delta != 0.0:  # Eq. 11: delta * L_distill(teacher; 1)
                w = torch.cat([w, _const((float(delta),), torch.float32, dev)
                               .view(1, 1).expand(1, B)])
                t = torch.cat([t, torch.ones(1, B, device=dev)])
                src, copy = src + (0,), copy + (-1,)
        else:
            src, copy, wl, tl, wce_v, st = _static_terms(method, M, B, p, tau)
            src, copy = tuple(src), tuple(copy)
            w = _const(tuple(float(v) for v in wl), torch.float32, dev).view(-1, 1)
            t = _const(tuple(float(v) for v in tl), torch.float32, dev).view(-1, 1)
            w, t = w.expand(w.shape[0], B), t.expand(t.shape[0], B)
            wce = _const((float(wce_v),), torch.float32, dev).expand(B)
            stats = _stats_const(M, *st, dev)
        src_t = _const(src or (0,), torch.int32, dev)
        copy_t = _const(copy or (-1,), torch.int32, dev)
        noise = (p["seed"], p["step"], p["a"]) if method == "tekap" else None

        def launch():
            rows, grad = D.fused_distill(zs.detach(), zm, y, src_t, copy_t, w, t, wce, flag,
                                         noise=noise, write_grad=write_grad,
                                         block_c=block_c)
            return rows, grad, flag

    loss, flags = FusedDistillFn.apply(zs, launch)
    return DistillOutput(loss, {**stats, "nonfinite": flags})

"""`distill_loss`: the one public entry point (docs/ARCHITECTURE.md, ckd.kernels).

Validates inputs, then runs either the eager reference (`reference.py`, the contract) or
the fused Triton kernels (`distill.py`) wrapped in a thin autograd.Function whose
backward only scales the gradient computed in the forward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ckd.kernels import reference as ref
from ckd.kernels.rng import dgkd_keep_mask

METHODS = ("nokd", "kd", "aver", "dgkd", "tekap", "classroom", "dkd")
BACKENDS = ("auto", "triton", "reference")
STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MENTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# per-method parameters (defaults as in reference.py); `seed`, `step`, `epoch` are accepted
# by every method so a trainer can always pass them (ignored where unused)
METHOD_PARAMS = {
    "nokd": {}, "aver": {}, "classroom": {"rank_logits": None},  # rank_logits: tests
    "kd": {"T": 4.0, "alpha_ce": 1.0, "alpha_kd": 1.0},
    "dgkd": {"p": 0.5, "seed": 0, "step": 0},
    "tekap": {"T": 4.0, "a": 0.1, "n_copies": 3, "lam_clean": 1.0, "lam_noisy": 0.8,
              "alpha_ce": 1.0, "seed": 0, "step": 0},
    "dkd": {"T": 4.0, "alpha_ce": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "epoch": None,
            "warmup": 20},
}
CONTEXT_PARAMS = ("seed", "step", "epoch")


@dataclass
class DistillOutput:
    loss: Tensor  # 0-dim, backpropagates into student_logits
    stats: dict[str, Tensor]  # see reference.py; tensors on device, no host sync


class NonFiniteError(FloatingPointError):
    pass


def check_finite(stats: dict[str, Tensor]) -> None:
    """Raise if the kernel flagged non-finite logits or bad labels (syncs: call it at log
    intervals, not every step)."""
    flag = int(stats["nonfinite"])
    if not flag:
        return
    what = [(name, fix) for bit, name, fix in (
        (1, "student logits", "lower the learning rate, clip gradients or train in fp32"),
        (2, "mentor logits (the cache)", "verify or rebuild the logit cache"),
        (4, "labels (outside [0, C))", "check the dataset's num_classes"),
    ) if flag & bit]
    raise NonFiniteError(
        "distill_loss saw non-finite or invalid input in: "
        + "; ".join(f"{name} (fix: {fix})" for name, fix in what))


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


def _validate(zs, zm, y, method, variant, granularity, validate, params) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    allowed = set(METHOD_PARAMS[method]) | set(CONTEXT_PARAMS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise TypeError(f"method {method!r} takes no parameter(s) {unknown}; valid: "
                        f"{sorted(allowed)}")
    if variant not in ("paper", "official"):
        raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
    if granularity not in ("batch", "sample"):
        raise ValueError(f"granularity must be 'batch' or 'sample', got {granularity!r}")
    if zs.dim() != 2:
        raise ValueError(f"student_logits must be [B, C], got shape {tuple(zs.shape)}")
    B, C = zs.shape
    if B == 0:
        raise ValueError("empty batch: student_logits has B = 0 rows")
    if C < 2:
        raise ValueError(f"need at least 2 classes, got C = {C}")
    if zs.dtype not in STUDENT_DTYPES:
        raise TypeError(f"student_logits dtype {zs.dtype} not supported; use one of "
                        f"{STUDENT_DTYPES}")
    if y.shape != (B,):
        raise ValueError(f"labels must be [B] = [{B}], got shape {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {y.dtype}")
    if y.device != zs.device:
        raise ValueError(f"labels on {y.device} but student_logits on {zs.device}")
    if zm is None:
        if method != "nokd":
            raise ValueError(f"method {method!r} needs mentor_logits [M, B, C]; got None")
    else:
        if zm.dim() != 3 or zm.shape[1:] != (B, C):
            raise ValueError(f"mentor_logits must be [M, B, C] = [M, {B}, {C}] (mentor 0 "
                             f"the teacher), got shape {tuple(zm.shape)}")
        if zm.shape[0] == 0 and method != "nokd":
            raise ValueError(f"method {method!r} needs at least one mentor (M = 0)")
        if zm.dtype not in MENTOR_DTYPES:
            raise TypeError(f"mentor_logits dtype {zm.dtype} not supported; use one of "
                            f"{MENTOR_DTYPES}")
        if zm.device != zs.device:
            raise ValueError(f"mentor_logits on {zm.device} but student_logits on "
                             f"{zs.device}")
    # the label range check reads values: a host sync on CUDA, so only on request there
    if validate is True or (validate == "auto" and zs.device.type == "cpu"):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"labels must lie in [0, {C}), got min {lo}, max {hi}")


def distill_loss(
    student_logits: Tensor, mentor_logits: Tensor | None, labels: Tensor, *,
    method: str = "classroom", tau: float = 12.0, beta: float = 1.0, delta: float = 0.0,
    lam: float | None = None, variant: str = "paper", granularity: str = "batch",
    backend: str = "auto", validate: bool | str = "auto", **method_params,
) -> DistillOutput:
    """Distillation loss of `method` (METHOD.md) and its selection statistics.

    student [B, C] fp32/bf16 (fp16, fp64 accepted); mentors [M, B, C] fp16/bf16/fp32, may
    be a non-contiguous view, mentor 0 is the teacher (None for nokd); labels [B] int.
    `tau` is the base temperature of classroom, aver and dgkd; kd/tekap/dkd take `T`
    (default 4). `beta`, `delta`, `lam`, `variant`, `granularity` apply to classroom.
    method_params: kd: T, alpha_ce, alpha_kd; dgkd: p, seed, step; tekap: T, a, n_copies,
    lam_clean, lam_noisy, alpha_ce, seed, step; dkd: T, alpha_ce, dkd_alpha, dkd_beta,
    epoch, warmup; classroom: rank_logits (student logits used only for ranking, default
    the student's own: a testing hook that holds the selection fixed).
    `validate`: "auto" checks the label range on CPU only (it needs a host sync), True
    always, False never (the kernel still flags bad labels in stats.nonfinite).
    """
    zs, zm, y = student_logits, mentor_logits, labels
    _validate(zs, zm, y, method, variant, granularity, validate, method_params)
    params = {**METHOD_PARAMS[method],
              **{k: v for k, v in method_params.items() if k in METHOD_PARAMS[method]}}
    if zm is not None and zm.shape[0] == 0:
        zm = None
    if resolve_backend(backend, zs.device) == "reference":
        if method == "classroom":
            params.update(tau=tau, beta=beta, delta=delta, lam=lam, variant=variant,
                          granularity=granularity)
        elif method in ("aver", "dgkd"):
            params["tau"] = tau
        loss, stats = ref.REFERENCE[method](zs, zm, y.long(), **params)
        return DistillOutput(loss, stats)
    from ckd.kernels import fused  # imports triton only when the kernels are used

    return fused.fused_loss(zs, zm, y, method, params, tau=tau, beta=beta, delta=delta,
                            lam=lam, variant=variant, granularity=granularity)


__all__ = ["DistillOutput", "distill_loss", "check_finite", "METHODS", "dgkd_keep_mask"]

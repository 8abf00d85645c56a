"""`distill_loss`: the one public entry point (docs/ARCHITECTURE.md, ckd.kernels).

Validates inputs, resolves the method's parameters from its declaration (ckd.methods), then
runs either the eager reference (`reference.py`, the contract) or the fused Triton kernels
(`distill.py`) wrapped in a thin autograd.Function whose backward only scales the gradient
computed in the forward pass.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ckd.kernels.output import DistillOutput, NonFiniteError, check_finite
from ckd.kernels.sparse_mentors import SparseMentors, validate_sparse
from ckd.methods.registry import COUNTER_DEFAULTS, Method, MethodError, get_method

BACKENDS = ("auto", "triton", "reference")
STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MENTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


def logit_method(name: str) -> Method:
    """The registered method `name`, which must be one `distill_loss` computes."""
    spec = get_method(name)
    if not spec.logit:
        raise MethodError(f"method {name!r} is not a logit method: distill_loss computes "
                          "only those; use ckd.methods.make_plan for method sums")
    return spec


def _validate(zs, zm, y, method, validate) -> None:
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
    method: str = "classroom", tau: float | None = None, beta: float | None = None,
    delta: float | None = None, lam: float | None = None, variant: str | None = None,
    granularity: str | None = None, backend: str = "auto", validate: bool | str = "auto",
    mentor_stats: Tensor | None = None,
    **method_params,
) -> DistillOutput:
    """Distillation loss of a logit `method` (docs/METHODS.md) and its selection statistics.

    student [B, C] fp32/bf16 (fp16, fp64 accepted); mentors [M, B, C] fp16/bf16/fp32, may
    be a non-contiguous view, mentor 0 is the teacher (None for nokd), or `SparseMentors`
    (top-k / sampled rows: docs/SPARSE.md; the methods of sparse_reference.SPARSE_METHODS);
    labels [B] int. Parameters not given take the method's declared defaults (`ckd methods`
    lists them).
    `tau`, `beta`, `delta`, `lam`, `variant`, `granularity` set the parameter of that name
    of the methods that declare it (classroom; `tau` also aver and dgkd) and are ignored
    by the others; kd/tekap/dkd name their temperature `T`. Counters `seed`, `step`
    (dgkd/tekap noise keys) and `epoch` (dkd warm-up, counted from 1) are accepted by every
    method and ignored where unused; any other unknown keyword is a TypeError.
    `validate`: "auto" checks the label range on CPU only (it needs a host sync), True
    always, False never (the kernel still flags bad labels in stats.nonfinite).
    `mentor_stats` [M, B, 2] fp32: `mentor_row_stats(mentor_logits, labels)` (the cache
    stores them): the fused ranking reads these instead of a pass over mentor logits;
    computed here when None. `step` and `epoch` may be 0-dim device tensors (CUDA-graph
    capture: the kernels read them on the device).
    """
    zs, zm, y = student_logits, mentor_logits, labels
    spec = logit_method(method)
    unknown = sorted(k for k in method_params
                     if k not in COUNTER_DEFAULTS and spec.param(k) is None)
    if unknown:
        raise TypeError(f"method {method!r} takes no parameter(s) {unknown}; valid: "
                        f"{[p.name for p in spec.params] + list(COUNTER_DEFAULTS)}")
    shortcuts = dict(tau=tau, beta=beta, delta=delta, lam=lam, variant=variant,
                     granularity=granularity)
    given = {k: v for k, v in shortcuts.items() if v is not None and spec.param(k)}
    given.update({k: v for k, v in method_params.items() if k not in COUNTER_DEFAULTS})
    params = spec.resolve(given)
    counters = spec.counter_values(method_params)
    if isinstance(zm, SparseMentors):  # top-k / sampled mentors: docs/SPARSE.md
        return _sparse_loss(zs, zm, y, method, params, counters, backend, validate)
    _validate(zs, zm, y, method, validate)
    if zm is not None and zm.shape[0] == 0:
        zm = None
    if resolve_backend(backend, zs.device) == "reference":
        counters = {k: int(v) if isinstance(v, Tensor) else v for k, v in counters.items()}
        loss, stats = spec.reference(zs, zm, y.long(), **params, **counters)
        return DistillOutput(loss, stats)
    from ckd.kernels import fused  # imports triton only when the kernels are used

    return fused.fused_loss(zs, zm, y, method, {**params, **counters},
                            tau=params.get("tau"), beta=params.get("beta"),
                            delta=params.get("delta"), lam=params.get("lam"),
                            variant=params.get("variant"),
                            granularity=params.get("granularity"),
                            mentor_stats=_check_stats(mentor_stats, zm, y))


def _check_stats(stats: Tensor | None, zm: Tensor | None, y: Tensor) -> Tensor | None:
    if stats is None or zm is None:
        return None
    want = (zm.shape[0], y.shape[0], 2)
    if tuple(stats.shape) != want or stats.dtype != torch.float32:
        raise ValueError(f"mentor_stats must be float32 {list(want)} (mentor_row_stats of "
                         f"the mentor logits), got {stats.dtype} {list(stats.shape)}")
    if stats.device != zm.device:
        raise ValueError(f"mentor_stats on {stats.device} but mentor_logits on {zm.device}")
    return stats


def _sparse_loss(zs, sm, y, method, params, counters, backend, validate) -> DistillOutput:
    from ckd.kernels import sparse_reference as sref

    _validate(zs, None, y, "nokd", validate)
    validate_sparse(sm, method, sref.SPARSE_METHODS, zs.shape[0], zs.shape[1], zs.device)
    if resolve_backend(backend, zs.device) == "reference":
        loss, stats = sref.SPARSE_REFERENCE[method](zs, sm, y.long(), **params, **counters)
        return DistillOutput(loss, stats)
    from ckd.kernels.sparse import sparse_fused_loss

    return sparse_fused_loss(zs, sm, y, method, {**params, **counters},
                             tau=params.get("tau"), beta=params.get("beta"),
                             delta=params.get("delta"), lam=params.get("lam"),
                             variant=params.get("variant"),
                             granularity=params.get("granularity"))


__all__ = ["DistillOutput", "NonFiniteError", "check_finite", "distill_loss",
           "logit_method", "resolve_backend"]

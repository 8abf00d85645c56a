"""`terms_loss`: the kernels' entry point (docs/ARCHITECTURE.md, ckd.kernels).

Validates inputs, then runs the fused Triton kernels of a term table (`terms.py`) wrapped
in a thin autograd.Function whose backward only scales the gradient computed in the
forward pass. Knows tensors and numbers, never a method: `ckd.methods.distill_loss`
resolves a method's parameters, its capabilities and its table, and runs its eager
reference where the kernels do not (or are not asked to) run it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ckd.kernels.output import DistillOutput, NonFiniteError, check_finite
from ckd.kernels.sparse_mentors import SparseMentors, validate_sparse
from ckd.kernels.terms import Decoupled, Ranking, TermTable

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


def validate_inputs(zs: Tensor, zm: Tensor | None, y: Tensor, needs_mentors: bool,
                    validate: bool | str = "auto", who: str = "this loss") -> None:
    """Shapes, dtypes, devices and (on request) the label range of a loss's inputs; errors
    name the fix."""
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
        if needs_mentors:
            raise ValueError(f"{who} needs mentor_logits [M, B, C]; got None")
    else:
        if zm.dim() != 3 or zm.shape[1:] != (B, C):
            raise ValueError(f"mentor_logits must be [M, B, C] = [M, {B}, {C}] (mentor 0 "
                             f"the teacher), got shape {tuple(zm.shape)}")
        if zm.shape[0] == 0 and needs_mentors:
            raise ValueError(f"{who} needs at least one mentor (M = 0)")
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


def terms_loss(zs: Tensor, zm: Tensor | SparseMentors | None, y: Tensor,
               table: TermTable | Decoupled, *, seed: int = 0, step: int | Tensor = 0,
               epoch: int | Tensor | None = None, mentor_stats: Tensor | None = None,
               rank_logits: Tensor | None = None, validate: bool | str = "auto",
               who: str = "this loss", rank_keys: Tensor | None = None) -> DistillOutput:
    """The fused loss of a term table (terms.py) on dense or sparse mentors, inputs checked
    (`validate` as `ckd.methods.distill_loss`). The kernels' one entry point: a method
    reaches it through its declaration's `terms`. `rank_keys` [1 + M, B]: the scores of a
    Ranking with `external_key` (terms.py)."""
    if isinstance(zm, SparseMentors):  # top-k / sampled mentors: docs/SPARSE.md
        validate_inputs(zs, None, y, False, validate)
        validate_sparse(zm, zs.shape[0], zs.shape[1], zs.device)
        from ckd.kernels.sparse import sparse_fused_loss  # noqa: PLC0415 - needs triton

        return sparse_fused_loss(zs, zm, y, table, seed=seed, step=step,
                                 rank_logits=rank_logits)
    validate_inputs(zs, zm, y, _reads(table), validate, who)
    _check_keys(table, rank_keys, zm, zs)
    if zm is not None and zm.shape[0] == 0:
        zm = None
    from ckd.kernels import launch  # noqa: PLC0415 - needs triton (CPU users never do)

    return launch.fused_loss(zs, zm, y, table, seed=seed, step=step, epoch=epoch,
                            mentor_stats=_check_stats(mentor_stats, zm, y),
                            rank_logits=rank_logits, rank_keys=rank_keys)


def _reads(table: TermTable | Decoupled) -> bool:
    return isinstance(table, Decoupled) or bool(table.src)


def _check_keys(table: TermTable | Decoupled, keys: Tensor | None, zm: Tensor | None,
                zs: Tensor) -> None:
    """An external-key Ranking needs float32 keys [1 + M, B] on the student's device."""
    sel = getattr(table, "select", None)
    if not isinstance(sel, Ranking) or not sel.external_key:
        return
    if sel.per_sample or sel.official:
        raise ValueError("external ranking keys rank at batch granularity with the paper "
                         "arithmetic (per_sample=False, official=False)")
    want = (0 if zm is None else zm.shape[0]) + 1, zs.shape[0]
    if keys is None or tuple(keys.shape) != want or keys.dtype != torch.float32 or \
            keys.device != zs.device:
        got = None if keys is None else (keys.dtype, list(keys.shape), str(keys.device))
        raise ValueError(f"this ranking reads external keys: pass rank_keys float32 "
                         f"{list(want)} on {zs.device} (row 0 the student), got {got}")


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


__all__ = ["DistillOutput", "NonFiniteError", "check_finite", "resolve_backend", "terms_loss",
           "validate_inputs"]

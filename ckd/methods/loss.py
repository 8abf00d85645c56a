"""`distill_loss`: a registered logit method's loss, on the backend its capabilities allow.

The method's declaration says what it can run on: its eager reference (always), its term
table for the fused kernels (`terms`: capability *fused*) and its sparse-mentor reference
(`sparse`: capability *sparse*; with `terms`, sparse mentors run fused too). A method
without a fused form runs its reference under `backend="auto"`; an explicit
`backend="triton"` refuses it by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ckd.kernels.api import resolve_backend, terms_loss, validate_inputs
from ckd.kernels.output import DistillOutput
from ckd.kernels.sparse_mentors import SparseMentors, validate_sparse
from ckd.methods.registry import COUNTER_DEFAULTS, Method, MethodError, all_methods, get_method


def logit_method(name: str) -> Method:
    """The registered method `name`, which must be one `distill_loss` computes."""
    spec = get_method(name)
    if not spec.logit:
        raise MethodError(f"method {name!r} is not a logit method: distill_loss computes "
                          "only those; use ckd.methods.make_plan for method sums")
    return spec


def check_sparse_method(spec: Method) -> None:
    """Refuse a method that cannot run on sparse mentors, naming the methods that can."""
    if spec.sparse is None:
        can = [n for n, m in all_methods().items() if m.logit and m.sparse is not None]
        raise ValueError(
            f"method {spec.name!r} runs on dense mentor logits only (it needs every class); "
            f"sparse mentors (topk:K, sample:S) work with {', '.join(can)}. Use a dense "
            "cache (`ckd cache-logits --logits dense`) for this method")


def method_backend(spec: Method, backend: str, device: torch.device) -> str:
    """'triton' or 'reference' for this method: `auto` picks the kernels where they run and
    the method has a fused form; an explicit `triton` without one is refused by name."""
    chosen = resolve_backend(backend, device)
    if chosen == "triton" and not spec.fused:
        if backend == "triton":
            raise MethodError(f"method {spec.name!r} has no fused kernel form (its "
                              "declaration gives no `terms`): use backend 'reference' or "
                              "'auto', which runs its eager reference")
        return "reference"
    return chosen


_TABLES: dict[tuple, tuple[dict, Any]] = {}


def _resolved_table(spec: Method, given: dict, M: int) -> tuple[dict, Any]:
    """(parameters, term table) of a method, resolved and built once per (method, given
    values, M): the host cost of a step stays a lookup (a tensor-valued hook: no cache)."""
    if any(isinstance(v, Tensor) for v in given.values()):  # a tensor hook: no cache
        params = spec.resolve(given)
        return params, spec.terms(params, M)
    key = (spec.name, id(spec), tuple(sorted(given.items())), M)
    hit = _TABLES.get(key)
    if hit is None:
        params = spec.resolve(given)
        hit = _TABLES[key] = (params, spec.terms(params, M))
    return hit


def distill_loss(
    student_logits: Tensor, mentor_logits: Tensor | SparseMentors | None, labels: Tensor, *,
    method: str = "classroom", tau: float | None = None, beta: float | None = None,
    delta: float | None = None, lam: float | None = None, variant: str | None = None,
    granularity: str | None = None, backend: str = "auto", validate: bool | str = "auto",
    mentor_stats: Tensor | None = None, **method_params: Any,
) -> DistillOutput:
    """Distillation loss of a logit `method` (docs/METHODS.md) and its selection statistics.

    student [B, C] fp32/bf16 (fp16, fp64 accepted); mentors [M, B, C] fp16/bf16/fp32, may
    be a non-contiguous view, mentor 0 is the teacher (None for methods that read none), or
    `SparseMentors` (top-k / sampled rows: docs/SPARSE.md; methods declaring `sparse`);
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
    counters = spec.counter_values(method_params)
    sparse = isinstance(zm, SparseMentors)
    if sparse:
        check_sparse_method(spec)
    if method_backend(spec, backend, zs.device) == "triton":
        M = 0 if zm is None else zm.shape[0]
        params, table = _resolved_table(spec, given, M)
        return terms_loss(zs, zm, y, table, mentor_stats=mentor_stats,
                          validate=validate, rank_logits=params.get("rank_logits"),
                          who=f"method {method!r}", **counters)
    params = spec.resolve(given)
    if sparse:
        validate_inputs(zs, None, y, False, validate)
        validate_sparse(zm, zs.shape[0], zs.shape[1], zs.device)
    else:
        validate_inputs(zs, zm, y, spec.mentors != "none", validate, f"method {method!r}")
        if zm is not None and zm.shape[0] == 0:
            zm = None
    counters = {k: int(v) if isinstance(v, Tensor) else v for k, v in counters.items()}
    run = spec.sparse if sparse else spec.reference
    loss, stats = run(zs, zm, y.long(), **params, **counters)
    return DistillOutput(loss, stats)

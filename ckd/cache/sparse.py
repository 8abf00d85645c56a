"""Sparse logit storage (`cache-logits --logits topk:K|sample:S`): the per-mentor arrays of a
sparse mentor, declared as `ArraySpec`s (layout.py's mechanism), their verification, and
how gathered rows become `SparseMentors` (docs/SPARSE.md states the math).

A sparse mentor stores, instead of `logits` [S, N, C]:

    topk:K    topk_ids     uint8|uint16|int32 [S, N, K]   the K largest logits' classes
              topk_logits  fp16|fp32 [S, N, K]            their logits (the cache dtype)
              topk_rest    fp32 [S, N, 2]                 logsumexp and mean logit of the rest
    sample:S  sample_ids    uint8|uint16|int32 [S, N, S]  distinct drawn classes (count 0: empty)
              sample_counts uint8|uint16 [S, N, S]        draws per class (sum S per row)
              sample_logits fp16|fp32 [S, N, S]           the logit at each drawn class

next to the same `stats` array as a dense mentor (true-class log-prob, row logsumexp).
Draws are seeded by a crc32c of the unit's stored logits: rebuilding a unit gives the same
draws. Ids use the smallest integer type holding C classes, counts the smallest holding S.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import crc32c
import numpy as np
import torch

from ckd.kernels.sparse_mentors import (
    SparseMentors,
    bytes_per_row,
    count_dtype,
    id_dtype,
    parse_mode,
    sparsify_sample,
    sparsify_topk,
)

from .layout import ArraySpec

_TORCH_TO_NP = {torch.uint8: "uint8", torch.uint16: "uint16", torch.int32: "int32"}
_LAST: dict[str, Any] = {"unit": None, "spec": None, "value": None}  # the last unit's rows
_LOCK = threading.Lock()


def _sparsified(u: Any, spec: str) -> SparseMentors:
    """The unit's rows in mode `spec` (computed once per unit for all its arrays; the memo
    holds the unit itself, so a later unit can never be mistaken for it)."""
    with _LOCK:
        return _sparsify_unit(u, spec)


def _sparsify_unit(u: Any, spec: str) -> SparseMentors:
    if _LAST["unit"] is not u or _LAST["spec"] != spec:
        logits = torch.from_numpy(np.ascontiguousarray(u.logits))  # [slots, samples, C]
        labels = torch.from_numpy(np.asarray(u.labels)).long()
        mode, n = parse_mode(spec, logits.shape[-1])
        if mode == "topk":
            sm = sparsify_topk(logits, labels, n)
        else:
            seed = crc32c.crc32c(np.ascontiguousarray(u.logits).tobytes())
            sm = sparsify_sample(logits, labels, n, torch.Generator().manual_seed(seed))
        _LAST.update(unit=u, spec=spec, value=sm)
    return _LAST["value"]


def sparse_array_specs(spec: str, num_classes: int) -> tuple[Any, ...]:
    """The ArraySpecs replacing `logits` for a mentor stored as `spec`."""
    mode, n = parse_mode(spec, num_classes)
    ids_dt = _TORCH_TO_NP[id_dtype(num_classes)]
    width = (lambda lay: (n,))  # noqa: E731 - per-row shape of the slot arrays

    def ids(u):
        return _sparsified(u, spec).ids.numpy().astype(ids_dt)

    def vals(u):
        return _sparsified(u, spec).logits.numpy().astype(u.logits.dtype)

    if mode == "topk":
        def rest(u):
            sm = _sparsified(u, spec)
            return torch.stack([sm.rest_lse, sm.rest_mean], -1).numpy().astype("float32")

        return (ArraySpec("topk_ids", ids_dt, width, ("k",), "data", ids),
                ArraySpec("topk_logits", None, width, ("k",), "data", vals),
                ArraySpec("topk_rest", "float32", lambda lay: (2,), ("rest_stat",), "data",
                          rest))
    cnt_dt = _TORCH_TO_NP[count_dtype(n)]

    def counts(u):
        return _sparsified(u, spec).counts.numpy().astype(cnt_dt)

    return (ArraySpec("sample_ids", ids_dt, width, ("draw",), "data", ids),
            ArraySpec("sample_counts", cnt_dt, width, ("draw",), "data", counts),
            ArraySpec("sample_logits", None, width, ("draw",), "data", vals))


def sparse_problems(spec: str, num_classes: int, named: dict[str, np.ndarray],
                    where: str) -> list[str]:
    """Checks `verify` runs on one unit of a sparse mentor: ids in [0, C), finite logits,
    counts summing to S (sample), finite rest statistics (topk)."""
    mode, n = parse_mode(spec, num_classes)
    out = []
    ids = named[f"{mode}_ids"].astype(np.int64)
    vals = named[f"{mode}_logits"]
    real = named["sample_counts"] > 0 if mode == "sample" else np.ones(ids.shape, bool)
    bad = int(((ids < 0) | (ids >= num_classes))[real].sum())
    if bad:
        out.append(f"{where}: {bad} class ids outside [0, {num_classes})")
    if not np.isfinite(vals[real]).all():
        out.append(f"{where}: {int((~np.isfinite(vals[real])).sum())} non-finite logits")
    if mode == "sample":
        sums = named["sample_counts"].astype(np.int64).sum(-1)
        if (sums != n).any():
            out.append(f"{where}: {int((sums != n).sum())} rows whose draw counts do not sum "
                       f"to S = {n}")
    else:
        rest = named["topk_rest"]
        if np.isnan(rest).any() or np.isposinf(rest[..., 0]).any():
            out.append(f"{where}: invalid rest statistics (NaN or +inf)")
    return out


def rows_to_sparse(spec: str, num_classes: int, arrays: dict[str, torch.Tensor],
                   stats: torch.Tensor) -> SparseMentors:
    """One mentor's gathered rows ([B, ...] per array, `stats` [B, 2] = (true log-prob,
    logsumexp)) as a 1-mentor SparseMentors. `spec` 'dense' (a dense mentor in a mixed
    set) becomes K = C slots with an empty rest: exact."""
    mode, n = parse_mode(spec, num_classes)
    lse, true_logp = stats[:, 1].float()[None], stats[:, 0].float()[None]
    if mode == "dense":
        z = arrays["logits"]
        B, C = z.shape
        ids = torch.arange(C, device=z.device, dtype=torch.int32).expand(1, B, C)
        return SparseMentors(ids, z[None], torch.ones_like(ids), lse, true_logp,
                             torch.full_like(lse, float("-inf")), torch.zeros_like(lse),
                             ("topk",), num_classes)
    ids = arrays[f"{mode}_ids"].to(torch.int32)[None]
    vals = arrays[f"{mode}_logits"][None]
    if mode == "topk":
        rest = arrays["topk_rest"].float()
        return SparseMentors(ids, vals, torch.ones_like(ids), lse, true_logp,
                             rest[:, 0][None], rest[:, 1][None], ("topk",), num_classes)
    counts = arrays["sample_counts"].to(torch.int32)[None]
    return SparseMentors(ids, vals, counts, lse, true_logp, torch.full_like(lse, float("-inf")),
                         torch.zeros_like(lse), ("sample",), num_classes)




def logits_modes(logits: str | Mapping[str, str], aliases: list[str], num_classes: int
                 ) -> dict[str, str]:
    """alias -> storage mode from `--logits` ('topk:10' for all, 'r110=dense,r8=sample:16'
    per alias, unnamed aliases dense), each checked against C (K >= C, S < 1 refused)."""
    if isinstance(logits, str):
        parts = [p.strip() for p in logits.split(",") if p.strip()] or ["dense"]
        if len(parts) == 1 and "=" not in parts[0]:
            logits = {a: parts[0] for a in aliases}
        else:
            bad = [p for p in parts if "=" not in p]
            if bad:
                raise ValueError(f"--logits {logits!r}: give one mode for every mentor "
                                 "(topk:10) or ALIAS=MODE pairs (r110=dense,r8=sample:16)")
            pairs = [tuple(s.strip() for s in p.split("=", 1)) for p in parts]
            twice = sorted({a for a, _ in pairs if [b for b, _ in pairs].count(a) > 1})
            if twice:
                raise ValueError(f"--logits {logits!r} sets mentor(s) {', '.join(twice)} "
                                 "more than once: give each mentor one mode")
            logits = dict(pairs)
    unknown = sorted(set(logits) - set(aliases))
    if unknown:
        raise ValueError(f"--logits names mentors {unknown} that are not in --mentors "
                         f"({', '.join(aliases)})")
    out = {}
    for alias in aliases:
        spec = str(logits.get(alias, "dense")).strip()
        try:
            mode, n = parse_mode(spec, num_classes)
        except ValueError as err:
            raise ValueError(f"--logits (mentor {alias!r}): {err}") from err
        if mode == "sample" and n > num_classes:
            raise ValueError(f"--logits (mentor {alias!r}): sample:{n} stores {n} draw slots "
                             f"per row, more than the C = {num_classes} classes: that is "
                             "larger than dense logits, which are exact; use dense, or "
                             f"sample:S with S <= {num_classes}")
        out[alias] = "dense" if mode == "dense" else f"{mode}:{n}"
    return out


def storage_lines(modes: Mapping[str, str], num_classes: int, rows: int,
                  logit_bytes: int = 2) -> list[str]:
    """What each mentor will take (raw, before compression), printed before a build."""
    dense = bytes_per_row("dense", num_classes, logit_bytes)
    out = []
    for alias, spec in modes.items():
        b = bytes_per_row(spec, num_classes, logit_bytes)
        out.append(f"{alias}: --logits {spec}: {b} B per view ({b / dense:.3f} of dense), "
                   f"{b * rows / 2**20:.1f} MiB for {rows} rows (raw, before compression)")
    return out

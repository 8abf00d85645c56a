"""Sparse mentor logits: the in-memory type, how a dense row becomes one, and its storage cost.

Two sparse modes (docs/SPARSE.md states the math):

- `topk:K`: per row the K largest logits (class ids + values) and two statistics of the
  other C-K classes, which form one "rest" bucket: their logsumexp at T=1 (exact rest
  mass) and their mean logit (the rest's temperature model, see `rest_log_mass`).
- `sample:S`: S draws from softmax(z) at T=1, kept as the distinct drawn class ids with
  their counts (counts/S estimates the mentor's probabilities without bias) and the
  mentor's logit at each drawn id (for importance weights at T != 1).

Every mode also carries, per row, the logsumexp of the full row and the exact log-prob of
the true class at T=1 (ClassroomKD ranks from it, so sparse and dense caches rank alike).
All statistics are computed from the logits as a dense cache stores them (fp16 rounded),
in fp32, so a sparse row describes exactly the dense cache's row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("dense", "topk", "sample")


def parse_mode(spec: str, num_classes: int | None = None) -> tuple[str, int]:
    """'dense' | 'topk:K' | 'sample:S' -> (mode, K or S; 0 for dense), with clear errors."""
    name, _, arg = str(spec).partition(":")
    if name == "dense" and not arg:
        return "dense", 0
    if name not in ("topk", "sample") or not arg.strip().isdigit():
        raise ValueError(f"logit storage mode {spec!r}: use dense, topk:K or sample:S "
                         "(e.g. topk:10, sample:16)")
    n = int(arg)
    if name == "topk" and n < 1:
        raise ValueError(f"{spec!r}: topk needs K >= 1")
    if name == "sample" and n < 1:
        raise ValueError(f"{spec!r}: sample needs S >= 1 draws")
    if name == "topk" and num_classes is not None and n >= num_classes:
        raise ValueError(f"{spec!r}: K = {n} >= C = {num_classes} classes keeps every class; "
                         f"use --logits dense (or topk:K with K < {num_classes})")
    return name, n


def id_dtype(num_classes: int) -> torch.dtype:
    """Smallest integer dtype holding a class id (storage packing)."""
    return torch.uint8 if num_classes <= 256 else \
        torch.uint16 if num_classes <= 65536 else torch.int32


def count_dtype(num_draws: int) -> torch.dtype:
    return torch.uint8 if num_draws <= 255 else torch.uint16 if num_draws <= 65535 \
        else torch.int32


def bytes_per_row(spec: str, num_classes: int, logit_bytes: int = 2) -> int:
    """Stored bytes of one view of one mentor (before compression), stats included:
    dense C*logit; topk K*(id + logit) + 8 (rest lse, rest mean, fp32); sample
    S*(id + count + logit) + 0 (the padding slots are stored: fixed width S). Every mode
    also stores the per-view mentor statistics (true-class log-prob, row logsumexp: 8 B)."""
    mode, n = parse_mode(spec, num_classes)
    stats = 8
    if mode == "dense":
        return num_classes * logit_bytes + stats
    idb = torch.empty(0, dtype=id_dtype(num_classes)).element_size()
    if mode == "topk":
        return n * (idb + logit_bytes) + 8 + stats
    cb = torch.empty(0, dtype=count_dtype(n)).element_size()
    return n * (idb + cb + logit_bytes) + stats


@dataclass
class SparseMentors:
    """Sparse rows of M mentors for one batch (mentor 0 the teacher), K slots per row.

    ids [M, B, K] int: class ids (topk: the K largest logits, any order; sample: the
    distinct drawn classes); logits [M, B, K] fp16/fp32: the mentor's logit at each id;
    counts [M, B, K] int: sample: times drawn (0 = empty slot: id and logit ignored);
    topk: 1 per slot (0 = empty slot); lse [M, B]: logsumexp of the full row at T=1;
    true_logp [M, B]: log softmax(z)[label]; rest_lse / rest_mean [M, B]: logsumexp and
    mean logit of the classes not in the row (topk; -inf / 0 where there are none, and
    for sampled mentors); modes: per mentor 'topk' or 'sample'.
    """

    ids: Tensor
    logits: Tensor
    counts: Tensor
    lse: Tensor
    true_logp: Tensor
    rest_lse: Tensor
    rest_mean: Tensor
    modes: tuple[str, ...]
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.ids.shape)

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def select(self, mentors: list[int]) -> SparseMentors:
        idx = torch.as_tensor(mentors, dtype=torch.long, device=self.device)
        f = {k: getattr(self, k).index_select(0, idx) for k in
             ("ids", "logits", "counts", "lse", "true_logp", "rest_lse", "rest_mean")}
        return SparseMentors(**f, modes=tuple(self.modes[i] for i in mentors),
                             num_classes=self.num_classes)

    def to(self, device: torch.device | str) -> SparseMentors:
        f = {k: getattr(self, k).to(device, non_blocking=True) for k in
             ("ids", "logits", "counts", "lse", "true_logp", "rest_lse", "rest_mean")}
        return SparseMentors(**f, modes=self.modes, num_classes=self.num_classes)

    def densify(self) -> Tensor:
        """[M, B, C] fp32 logits with the unknown classes at -inf (tests, debugging)."""
        M, B, _ = self.shape
        out = torch.full((M, B, self.num_classes), float("-inf"), device=self.device)
        keep = self.counts > 0
        src = torch.where(keep, self.logits.float(), float("-inf"))
        ids = torch.where(keep, self.ids.long(), 0)
        return out.scatter_reduce(2, ids, src, "amax")


def _row_stats(z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logsumexp(z, -1)
    true = z.gather(-1, labels.long().view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)
    return lse, true - lse


def sparsify_topk(logits: Tensor, labels: Tensor, k: int) -> SparseMentors:
    """Top-k rows of dense mentor logits [M, B, C] (as a dense cache stores them)."""
    M, B, C = logits.shape
    if not 1 <= k <= C:
        raise ValueError(f"topk needs 1 <= K <= C = {C}, got K = {k}")
    z = logits.float()
    lse, true_logp = _row_stats(z, labels)
    vals, ids = z.topk(k, dim=-1, sorted=True)
    rest = z.scatter(-1, ids, float("-inf"))
    if k < C:
        rest_lse = torch.logsumexp(rest, -1)
        rest_mean = (z.double().sum(-1) - vals.double().sum(-1)).float() / (C - k)
    else:
        rest_lse = torch.full_like(lse, float("-inf"))
        rest_mean = torch.zeros_like(lse)
    return SparseMentors(ids.to(torch.int32), logits.gather(-1, ids),
                         torch.ones_like(ids, dtype=torch.int32), lse, true_logp, rest_lse,
                         rest_mean, ("topk",) * M, C)


def sparsify_sample(logits: Tensor, labels: Tensor, s: int,
                    generator: torch.Generator | None = None) -> SparseMentors:
    """S draws per row from softmax(logits) at T=1 -> distinct ids with counts, S slots
    (empty slots: count 0). `generator` makes the draws reproducible."""
    M, B, C = logits.shape
    if s < 1:
        raise ValueError(f"sample needs S >= 1 draws, got {s}")
    z = logits.float()
    lse, true_logp = _row_stats(z, labels)
    probs = torch.softmax(z, -1).reshape(M * B, C)
    draws = torch.multinomial(probs.cpu(), s, replacement=True, generator=generator)
    draws = draws.to(z.device)
    hist = torch.zeros(M * B, C, dtype=torch.int32, device=z.device)
    hist.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    width = min(s, C)
    counts, ids = hist.topk(width, dim=-1, sorted=True)  # drawn classes first
    if width < s:  # keep the fixed width S of the storage format
        pad = s - width
        counts = torch.cat([counts, counts.new_zeros(M * B, pad)], 1)
        ids = torch.cat([ids, ids.new_zeros(M * B, pad)], 1)
    ids = torch.where(counts > 0, ids, 0).view(M, B, s)
    counts = counts.view(M, B, s)
    vals = torch.where(counts > 0, logits.gather(-1, ids.long()), 0)
    return SparseMentors(ids.to(torch.int32), vals.to(logits.dtype), counts.to(torch.int32),
                         lse, true_logp, torch.full_like(lse, float("-inf")),
                         torch.zeros_like(lse), ("sample",) * M, C)


def sparsify(logits: Tensor, labels: Tensor, spec: str,
             generator: torch.Generator | None = None) -> SparseMentors:
    """`spec` 'topk:K' or 'sample:S' (see `parse_mode`)."""
    mode, n = parse_mode(spec)
    if mode == "dense":
        raise ValueError("sparsify: 'dense' is not a sparse mode")
    return sparsify_topk(logits, labels, n) if mode == "topk" else \
        sparsify_sample(logits, labels, n, generator)


def stack(parts: list[SparseMentors]) -> SparseMentors:
    """One SparseMentors from several (e.g. a topk teacher and sampled peers): rows are
    padded with empty slots (count 0) to the widest K."""
    width = max(p.shape[2] for p in parts)

    def pad(x: Tensor, value: float) -> Tensor:
        extra = width - x.shape[2]
        return x if extra == 0 else torch.cat(
            [x, x.new_full((*x.shape[:2], extra), value)], 2)

    dt = functools.reduce(torch.promote_types, [p.logits.dtype for p in parts])
    return SparseMentors(
        torch.cat([pad(p.ids, 0) for p in parts]),
        torch.cat([pad(p.logits.to(dt), 0) for p in parts]),
        torch.cat([pad(p.counts, 0) for p in parts]),
        *(torch.cat([getattr(p, k) for p in parts])
          for k in ("lse", "true_logp", "rest_lse", "rest_mean")),
        sum((p.modes for p in parts), ()), parts[0].num_classes)


def validate_sparse(sm: SparseMentors, B: int, C: int, device: torch.device) -> None:
    """Shape/dtype checks of sparse mentors given to a loss."""
    M, Bm, K = sm.shape
    if Bm != B or sm.num_classes != C:
        raise ValueError(f"sparse mentors are for B = {Bm} rows of C = {sm.num_classes} "
                         f"classes, the student logits are [{B}, {C}]")
    if M == 0 or K == 0:
        raise ValueError(f"sparse mentors need M >= 1 mentors and K >= 1 slots, got {sm.shape}")
    for name in ("logits", "counts"):
        if tuple(getattr(sm, name).shape) != (M, B, K):
            raise ValueError(f"sparse mentors: {name} must be [M, B, K] = {[M, B, K]}, got "
                             f"{tuple(getattr(sm, name).shape)}")
    for name in ("lse", "true_logp", "rest_lse", "rest_mean"):
        if tuple(getattr(sm, name).shape) != (M, B):
            raise ValueError(f"sparse mentors: {name} must be [M, B] = {[M, B]}")
    if sm.ids.dtype.is_floating_point or sm.counts.dtype.is_floating_point:
        raise TypeError("sparse mentors: ids and counts must be integer tensors")
    if len(sm.modes) != M or set(sm.modes) - {"topk", "sample"}:
        raise ValueError(f"sparse mentors: modes must be 'topk'/'sample' per mentor, got "
                         f"{sm.modes}")
    if sm.device != device:
        raise ValueError(f"sparse mentors on {sm.device} but student_logits on {device}")

"""Term tables: what the fused kernels compute, as tensors and numbers (no method names).

A logit method's fused form is a `TermTable`: per sample

    loss_b = w_ce * CE(zs_b, y_b) + sum_j w_j T_j^2 KL(softmax(z_j / T_j) || softmax(zs / T_j))

with term j reading mentor `src[j]` (or TeKAP's noisy copy `copy[j]` of it: a * eta +
(1 - a) * z, eta drawn in the kernel from the (seed, step) key), at weight `weight[j]` and
temperature `temp[j]`. The weights are constants, or computed on the device by a
selection:

- `Ranking`: the student and the mentors ranked by their true-class scores (ClassroomKD,
  `reference.classroom_weights`), or by external keys per row (`external_key`:
  `reference.classroom_weights_from_scores`): the terms are mentors 0..M-1 in order, plus,
  when `delta_term`, the teacher at T = 1 with weight delta.
- `RandomDrop`: each mentor dropped with probability p per step (keyed by seed and step),
  the kept ones averaged at temperature tau; terms are mentors 0..M-1.

`Decoupled` is the other form the kernels run: DKD's target / non-target split of the
teacher's KL. Each registered method builds its own table from its parameters
(`ckd.methods`, the `terms=` of its declaration).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ranking:
    """ClassroomKD selection (docs/METHODS.md): ranks r_k = lam * score_k / sum, gate,
    temperatures 1 + tau (r_m - r_s) / r_m, weights beta * r_m (official: rounded ranks)."""

    lam: float
    tau: float
    beta: float = 1.0
    delta: float = 0.0
    official: bool = False
    per_sample: bool = False
    delta_term: bool = False  # one more term: the teacher at T = 1, weight delta
    # scores from an external key per row (`rank_keys` [1 + M, B], NaN = no key; e.g. a
    # pose model's PCK), batch granularity, paper arithmetic; the table then has no CE
    # term (w_ce 0): the caller weights its own task term by the logged student rank
    external_key: bool = False


@dataclass(frozen=True)
class RandomDrop:
    """Each mentor dropped with probability p per step; the kept ones weighted 1/|kept| at
    temperature tau (if every mentor is dropped the teacher is kept)."""

    p: float
    tau: float

    def threshold(self) -> int:
        """Dropped iff the 32-bit hash < threshold (an integer compare: exact)."""
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"drop probability p must be in [0, 1], got {self.p}")
        return int(self.p * 2.0**32)


@dataclass(frozen=True)
class TermTable:
    src: tuple[int, ...] = ()
    weight: tuple[float, ...] = ()
    temp: tuple[float, ...] = ()
    w_ce: float = 1.0
    copy: tuple[int, ...] | None = None  # per term: TeKAP copy index, -1 the mentor itself
    noise_a: float = 0.0
    select: Ranking | RandomDrop | None = None

    def __post_init__(self) -> None:
        n = len(self.src)
        if len(self.weight) != n or len(self.temp) != n or len(self.copies) != n:
            raise ValueError(f"term table: src, weight, temp and copy need one entry per "
                             f"term ({n}), got {len(self.weight)}, {len(self.temp)}, "
                             f"{len(self.copies)}")
        if any(t <= 0 for t in self.temp):
            raise ValueError(f"term table: temperatures must be > 0, got {self.temp}")

    @property
    def copies(self) -> tuple[int, ...]:
        return (-1,) * len(self.src) if self.copy is None else self.copy

    @property
    def noisy(self) -> bool:
        return any(c >= 0 for c in self.copies)

    def check(self, M: int) -> None:
        """Refuse a table that reads a mentor the batch does not have."""
        if any(not 0 <= s < M for s in self.src):
            raise ValueError(f"term table reads mentors {self.src} but the batch has M = {M}")

    def static_stats(self, M: int) -> tuple[list[float], list[float], list[float], float]:
        """(mentor_rank, mentor_active, mentor_temp, student_rank) of a table without a
        selection: per mentor the sum of its terms' weights, 1 if it has a term, the
        temperature of its first term (1 if none); the CE weight."""
        rank, active, temp = [0.0] * M, [0.0] * M, [1.0] * M
        for j in reversed(range(len(self.src))):
            m = self.src[j]
            rank[m] += self.weight[j]
            active[m], temp[m] = 1.0, self.temp[j]
        return rank, active, temp, self.w_ce


@dataclass(frozen=True)
class Decoupled:
    """DKD: alpha_ce CE + warm * T^2 (w_target TCKD + w_nontarget NCKD) with the teacher,
    warm = min(epoch / warmup, 1) (1 when no epoch is given)."""

    T: float
    alpha_ce: float
    w_target: float
    w_nontarget: float
    warmup: float


def ranked_terms(M: int, sel: Ranking, w_ce: float = 1.0) -> TermTable:
    """The table of a ranking selection over M mentors (weights come from the device)."""
    extra = 1 if sel.delta_term else 0
    return TermTable(src=tuple(range(M)) + (0,) * extra, weight=(0.0,) * (M + extra),
                     temp=(1.0,) * (M + extra), w_ce=w_ce, select=sel)


def dropped_terms(M: int, sel: RandomDrop) -> TermTable:
    sel.threshold()  # checks p
    return TermTable(src=tuple(range(M)), weight=(0.0,) * M, temp=(sel.tau,) * M, select=sel)

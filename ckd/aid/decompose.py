"""The KD loss split into an inter-class-similarity part and an intra-class-distribution
part (docs/AID.md).

For the samples i of class c, with p_i = softmax(z_i / T) of the mentor (t) and the
student (s) and class means  pbar_c = mean_{i in c} p_i:

    mean_i KL(p^t_i || p^s_i) = KL(pbar^t_c || pbar^s_c)                      (inter)
                              + [mean_i KL(p^t_i || p^s_i) - KL(pbar^t_c || pbar^s_c)]  (intra)

Both parts are >= 0 (KL is jointly convex). The inter part is the loss of the class-level
soft labels (which classes look alike); the intra part is what remains: how each sample's
distribution departs from its class mean, and whether the student follows. A student that
outputs exactly pbar^t_c for every sample of c has inter = 0 and intra = the mentor's
intra-class spread, mean_i KL(p^t_i || pbar^t_c). Every part is reported times T^2, the
scale of the KD loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _per_class_means(p: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [num_classes, C], counts [num_classes]) of the rows of p by label."""
    sums = p.new_zeros(num_classes, p.shape[1]).index_add(0, labels, p)
    counts = torch.bincount(labels, minlength=num_classes).to(p.dtype)
    return sums, counts


def _kl_rows(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (p * (log_p - log_q)).sum(-1)


def intra_class_kl(mentor_logits: torch.Tensor, student_logits: torch.Tensor,
                   labels: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """The intra-class part of the batch's KD loss (T^2 scaled, mean over the batch),
    differentiable in both logits: sum_c n_c [mean_{i in c} KL_i - KL(pbar^t_c || pbar^s_c)]
    / B, classes as they occur in the batch."""
    nc = int(max(mentor_logits.shape[1], int(labels.max()) + 1))
    log_t = F.log_softmax(mentor_logits.float() / T, -1)
    log_s = F.log_softmax(student_logits.float() / T, -1)
    p_t = log_t.exp()
    per_sample = _kl_rows(p_t, log_t, log_s).sum()
    st, n = _per_class_means(p_t, labels, nc)
    ss, _ = _per_class_means(log_s.exp(), labels, nc)
    keep = n > 0
    mt, ms = st[keep] / n[keep, None], ss[keep] / n[keep, None]
    inter = (n[keep] * _kl_rows(mt, mt.clamp_min(1e-30).log(), ms.clamp_min(1e-30).log())).sum()
    return (per_sample - inter) * T * T / labels.shape[0]


def inter_class_kl(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                   T: float = 4.0) -> torch.Tensor:
    """sum_c n_c KL(pbar^ref_c || pbar_c) / B (T^2 scaled): how far the class-mean soft labels
    of `logits` are from those of `ref_logits` (the inter part alone)."""
    nc = int(max(ref_logits.shape[1], int(labels.max()) + 1))
    sr, n = _per_class_means(F.softmax(ref_logits.float() / T, -1), labels, nc)
    sl, _ = _per_class_means(F.softmax(logits.float() / T, -1), labels, nc)
    keep = n > 0
    mr, ml = sr[keep] / n[keep, None], sl[keep] / n[keep, None]
    kl = _kl_rows(mr, mr.clamp_min(1e-30).log(), ml.clamp_min(1e-30).log())
    return (n[keep] * kl).sum() * T * T / labels.shape[0]


def check_temperature(T: float, flag: str = "--tau") -> None:
    """A KD temperature is a positive finite number (0 divides by zero, a negative one
    reverses every ranking)."""
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"{flag} {T:g} is invalid: the KD temperature must be a positive "
                         f"finite number (e.g. {flag} 4)")


@dataclass
class Decomposition:
    """Streaming sums over a whole split; `table()` gives the per-class rows."""

    num_classes: int
    T: float = 4.0

    def __post_init__(self) -> None:
        check_temperature(self.T)
        k = self.num_classes
        self.n = torch.zeros(k, dtype=torch.float64)
        self.kl = torch.zeros(k, dtype=torch.float64)         # sum_i KL(p^t_i || p^s_i)
        self.neg_ent_t = torch.zeros(k, dtype=torch.float64)  # sum_i sum_k p log p (mentor)
        self.sum_t = torch.zeros(k, k, dtype=torch.float64)   # sum_i p^t_i
        self.sum_s = torch.zeros(k, k, dtype=torch.float64)   # sum_i p^s_i
        self.correct_t = torch.zeros(k, dtype=torch.float64)
        self.correct_s = torch.zeros(k, dtype=torch.float64)

    @torch.no_grad()
    def add(self, mentor_logits: torch.Tensor, student_logits: torch.Tensor,
            labels: torch.Tensor) -> None:
        labels = labels.cpu()
        log_t = F.log_softmax(mentor_logits.double().cpu() / self.T, -1)
        log_s = F.log_softmax(student_logits.double().cpu() / self.T, -1)
        p_t, p_s = log_t.exp(), log_s.exp()
        k = self.num_classes
        self.n += torch.bincount(labels, minlength=k).double()
        self.kl.index_add_(0, labels, _kl_rows(p_t, log_t, log_s))
        self.neg_ent_t.index_add_(0, labels, (p_t * log_t).sum(-1))
        self.sum_t.index_add_(0, labels, p_t)
        self.sum_s.index_add_(0, labels, p_s)
        self.correct_t.index_add_(0, labels, (mentor_logits.argmax(-1).cpu() == labels).double())
        self.correct_s.index_add_(0, labels, (student_logits.argmax(-1).cpu() == labels).double())

    def table(self) -> list[dict[str, float]]:
        """One row per class and an 'all' row (sample-weighted means), T^2 scaled."""
        t2 = self.T * self.T
        n = self.n.clamp_min(1)
        mt, ms = self.sum_t / n[:, None], self.sum_s / n[:, None]
        inter = _kl_rows(mt, mt.clamp_min(1e-300).log(), ms.clamp_min(1e-300).log())
        total = self.kl / n
        spread = self.neg_ent_t / n - (mt * mt.clamp_min(1e-300).log()).sum(-1)
        rows = []
        for c in range(self.num_classes):
            if self.n[c] == 0:
                continue
            rows.append({"class": str(c), "n": int(self.n[c]), "kd": t2 * float(total[c]),
                         "inter": t2 * float(inter[c]),
                         "intra": t2 * float(total[c] - inter[c]),
                         "mentor_spread": t2 * float(spread[c]),
                         "mentor_acc": 100 * float(self.correct_t[c] / n[c]),
                         "student_acc": 100 * float(self.correct_s[c] / n[c])})
        w = self.n / self.n.sum()
        rows.append({"class": "all", "n": int(self.n.sum()),
                     **{key: sum(float(w[int(r["class"])]) * r[key] for r in rows)
                        for key in ("kd", "inter", "intra", "mentor_spread", "mentor_acc",
                                    "student_acc")}})
        return rows


COLUMNS = ("class", "n", "kd", "inter", "intra", "mentor_spread", "mentor_acc", "student_acc")


def markdown_table(rows: list[dict]) -> str:
    head = ("| class | n | KD loss | inter-class | intra-class | intra share | "
            "mentor intra spread | mentor acc | student acc |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        share = 100 * r["intra"] / r["kd"] if r["kd"] > 0 else float("nan")
        lines.append(f"| {r['class']} | {r['n']} | {r['kd']:.4f} | {r['inter']:.4f} | "
                     f"{r['intra']:.4f} | {share:.1f}% | {r['mentor_spread']:.4f} | "
                     f"{r['mentor_acc']:.2f} | {r['student_acc']:.2f} |")
    return "\n".join(lines)

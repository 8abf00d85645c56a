"""Pose losses, eager reference: nokd, kd, aver and ClassroomKD on rows of joint logits
with an external ranking key per sample.

Inputs, per batch of N samples with K joints and rows of D logits:
- `student [N, K, D]` (the only tensor with a gradient), `mentors [M, N, K, D]` or None;
- `target [N, K, D]` (per-segment Gaussians, `ckd.pose.codec.targets`), `weight [N, K]`;
- `segs`: the row's segments ([x bins, y bins] for SimCC, [all cells] for heatmaps);
- `student_key [N]`, `mentor_keys [M, N]`: each model's per-sample PCK on this view (NaN
  where the sample has no weighted joint; `ckd.pose.metrics.rank_key`), the ClassroomKD
  ranking key.

Per sample (all divided by K, then the mean over the batch):
- task `L_task[n] = (1/K) sum_k weight[n,k] sum_seg CE(target_seg, softmax(zs_seg))`;
- distillation, Eq. 15 of the ClassroomKD appendix: `L_distill[n](m; T) = (T^2/K) sum_k
  sum_seg KL(softmax(zm_seg / T) || softmax(zs_seg / T))`: for SimCC the x and y terms
  summed, each over the N*K joint rows, divided by K; for heatmaps the KL between the
  flattened heatmaps divided by K. **[choice]** the batch mean runs over the N samples
  (mmpose's KD loss: rows summed over joints, averaged over the batch, divided by K), so
  the loss does not shrink with K twice.

Methods (defaults in `POSE_DEFAULTS`, the paper's pose settings: tau 4, beta 2.5):
- nokd: `mean L_task`;  kd: `alpha_ce L_task + alpha_kd L_distill(teacher; T)`;
- aver: `L_task + sum_m L_distill(m; tau)`;
- classroom (paper variant only; the authors released no pose code): the ClassroomKD
  selection of `ckd.kernels.reference.classroom_weights` with each model's score its PCK
  (batch granularity: the mean PCK over the batch's samples with a weighted joint), i.e.
  `r_k = lam * P_k / sum P`, mentors with `r_m > r_s` active at `tau_m = 1 + tau (r_m -
  r_s) / r_m`, `L = (r_s + delta) L_task + beta sum_active r_m L_distill(m; tau_m) + delta
  L_distill(teacher; 1)`. Selection signals are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ckd.kernels.reference import classroom_weights
from ckd.kernels.sparse_reference import sparse_kl_rows

POSE_METHODS = ("nokd", "kd", "aver", "classroom")
POSE_DEFAULTS = {
    "nokd": {},
    "kd": {"T": 4.0, "alpha_ce": 1.0, "alpha_kd": 1.0},
    "aver": {"tau": 4.0},
    "classroom": {"tau": 4.0, "beta": 2.5, "delta": 0.0, "lam": None,
                  "granularity": "batch"},
}


def task_rows(student: Tensor, target: Tensor, weight: Tensor,
              segs: list[tuple[int, int]]) -> Tensor:
    """Per-sample task loss [N]."""
    zs = student.float()
    total = zs.new_zeros(zs.shape[:2])
    for a, b in segs:
        total = total - (target[..., a:b] * F.log_softmax(zs[..., a:b], -1)).sum(-1)
    return (weight * total).sum(1) / zs.shape[1]


def distill_rows(mentor: Tensor, student: Tensor, segs: list[tuple[int, int]],
                 T: Tensor | float) -> Tensor:
    """Per-sample Eq. 15 term [N]: (T^2 / K) sum_k sum_seg KL(mentor_T || student_T); T a
    number or [N]."""
    zs, zm = student.float(), mentor.float()
    t = torch.as_tensor(T, dtype=torch.float32, device=zs.device)
    t3 = t.reshape(-1, 1, 1) if t.dim() == 1 else t
    kl = zs.new_zeros(zs.shape[:2])
    for a, b in segs:
        log_p = F.log_softmax(zm[..., a:b] / t3, -1)
        log_q = F.log_softmax(zs[..., a:b] / t3, -1)
        kl = kl + (log_p.exp() * (log_p - log_q)).sum(-1)
    t2 = (t * t).reshape(-1) if t.dim() == 1 else t * t
    return t2 * kl.sum(1) / zs.shape[1]


def mentor_distill(mentors, m: int, student: Tensor, segs: list[tuple[int, int]],
                   T: Tensor | float) -> Tensor:
    """`distill_rows` of mentor m, from dense rows [M, N, K, D] or from top-k sparse rows
    (`SparseMentors` over the N*K joint rows of one-segment heatmap rows: the K+1-bucket KL
    of docs/SPARSE.md)."""
    if torch.is_tensor(mentors):
        return distill_rows(mentors[m], student, segs, T)
    if len(segs) != 1:
        raise ValueError("top-k sparse mentor rows hold heatmaps; SimCC rows are stored dense")
    n, k, d = student.shape
    t = torch.as_tensor(T, dtype=torch.float32, device=student.device)
    t_rows = t.reshape(-1, 1).expand(n, k).reshape(-1) if t.dim() == 1 else t
    kl = sparse_kl_rows(mentors, m, student.float().reshape(n * k, d), t_rows).reshape(n, k)
    t2 = (t * t).reshape(-1) if t.dim() == 1 else t * t
    return t2 * kl.sum(1) / k


def batch_key(keys: Tensor) -> Tensor:
    """Mean over samples with a key (non-NaN) [.., N] -> [.., 1]; 0 where none has one."""
    ok = ~torch.isnan(keys)
    n = ok.sum(-1, keepdim=True)
    s = torch.where(ok, keys, torch.zeros_like(keys)).sum(-1, keepdim=True)
    return torch.where(n > 0, s / n.clamp_min(1), torch.zeros_like(s))


def _stats(rank, active, temp, student_rank) -> dict[str, Tensor]:
    return {"mentor_rank": rank.float(), "mentor_active": active.float(),
            "mentor_temp": temp.float(),
            "student_rank": torch.as_tensor(student_rank, dtype=torch.float32).reshape(())}


def pose_loss(method: str, student: Tensor, mentors: Tensor | None, target: Tensor,
              weight: Tensor, segs: list[tuple[int, int]], *, student_key: Tensor | None = None,
              mentor_keys: Tensor | None = None, **params) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, stats) of `method` on one batch (module docstring)."""
    if method not in POSE_METHODS:
        raise ValueError(f"pose method must be one of {POSE_METHODS}, got {method!r}")
    p = {**POSE_DEFAULTS[method], **params}
    unknown = set(p) - set(POSE_DEFAULTS[method])
    if unknown:
        raise ValueError(f"pose method {method} takes {sorted(POSE_DEFAULTS[method])}, not "
                         f"{sorted(unknown)}")
    task = task_rows(student, target, weight, segs)
    m = 0 if mentors is None else mentors.shape[0]  # dense rows or SparseMentors
    zeros, ones = student.new_zeros(m), student.new_ones(m)
    if method == "nokd":
        return task.mean(), _stats(zeros, zeros, ones, 1.0)
    if m == 0:
        raise ValueError(f"pose method {method} needs mentor rows (--mentors / a pose cache)")
    if method == "kd":
        loss = p["alpha_ce"] * task + p["alpha_kd"] * mentor_distill(mentors, 0, student, segs,
                                                                     p["T"])
        one = zeros.clone()
        one[0] = 1.0
        return loss.mean(), _stats(one * p["alpha_kd"], one, one * (p["T"] - 1) + 1,
                                   p["alpha_ce"])
    if method == "aver":
        loss = task
        for k in range(m):
            loss = loss + mentor_distill(mentors, k, student, segs, p["tau"])
        return loss.mean(), _stats(ones, ones, ones * p["tau"], 1.0)
    return _classroom(student, mentors, task, segs, student_key, mentor_keys, p)


def _classroom(student, mentors, task, segs, student_key, mentor_keys, p):
    if student_key is None or mentor_keys is None:
        raise ValueError("pose classroom needs ranking keys: the student's PCK on the step "
                         "and each mentor's (from the cache or computed online)")
    keys = torch.cat([student_key[None].detach(), mentor_keys.detach()]).double()
    if p["granularity"] == "batch":
        keys = batch_key(keys)
    elif p["granularity"] != "sample":
        raise ValueError(f"granularity must be 'batch' or 'sample', got {p['granularity']!r}")
    keys = torch.nan_to_num(keys, nan=0.0)
    # score = exp(-ce) = PCK: the classification selection arithmetic, unchanged
    cw = classroom_weights(-torch.log(keys.float()), tau=p["tau"], beta=p["beta"],
                           delta=p["delta"], lam=p["lam"], variant="paper",
                           granularity="sample")
    n = student.shape[0]
    per = cw["w_ce"].expand(n) * task
    for k in range(mentors.shape[0]):
        w = cw["w_kl"][k].expand(n)
        term = w * mentor_distill(mentors, k, student, segs, cw["temp"][k].expand(n))
        per = per + torch.where(w != 0, term, torch.zeros_like(term))
    loss = per.mean()
    if p["delta"] != 0.0:
        loss = loss + p["delta"] * mentor_distill(mentors, 0, student, segs, 1.0).mean()
    act = cw["active"].float()
    n_act = act.sum(1)
    temp = torch.where(n_act > 0, (cw["temp"] * act).sum(1) / n_act.clamp_min(1.0), 1.0)
    return loss, _stats(cw["r_m"].mean(1), act.mean(1), temp, cw["r_s"].mean())

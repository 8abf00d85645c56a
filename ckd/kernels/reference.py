"""Eager reference of every logit distillation loss of docs/METHODS.md: the contract.

Each method is a plain PyTorch function `f(student [B,C], mentors [M,B,C] | None,
labels [B], **params) -> (loss, stats)` (parameters without defaults: they are declared
once, in `ckd.methods`), written for clarity and checked in the tests
against independent textbook formulas. The fused Triton kernels are tested against
these functions.

Conventions shared by all methods:
- Math runs in fp32 (fp64 if the student is fp64); the loss is a 0-dim tensor, mean
  over the batch; gradients flow into the student logits only.
- `L_distill(zm, zs; T) = T^2 * KL(softmax(zm/T) || softmax(zs/T))`, batch mean.
- Selection signals (ranks, masks, temperatures) are detached (docs/METHODS.md).
- `stats`: `mentor_rank [M]` (ClassroomKD rank r_m; for the other methods the weight
  of the mentor's distillation term), `mentor_active [M]` (float: fraction of samples
  at sample granularity), `mentor_temp [M]` (temperature used; 1 for an inactive
  mentor; mean over active samples at sample granularity), `student_rank []` (weight
  of the CE term's rank r_s, or the CE weight), `nonfinite []` int32 bit flag:
  1 = student logits, 2 = mentor logits (those the method reads), 4 = labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ckd.kernels.rng import dgkd_keep_mask, tekap_noise

Stats = dict[str, Tensor]
FLAG_STUDENT, FLAG_MENTOR, FLAG_LABEL = 1, 2, 4


def _acc(x: Tensor) -> Tensor:
    """Upcast to the accumulation dtype (fp64 stays fp64, everything else fp32)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _flag(zs: Tensor, mentors: list[Tensor], labels: Tensor) -> Tensor:
    """Non-finite / invalid-label flag, on device, without a host sync."""
    flag = (~torch.isfinite(zs)).any().to(torch.int32) * FLAG_STUDENT
    for z in mentors:
        flag = flag | (~torch.isfinite(z)).any().to(torch.int32) * FLAG_MENTOR
    bad_y = ((labels < 0) | (labels >= zs.shape[1])).any().to(torch.int32) * FLAG_LABEL
    return flag | bad_y


def kl_rows(z_mentor: Tensor, z_student: Tensor, T: Tensor | float) -> Tensor:
    """Per-sample KL(softmax(zm/T) || softmax(zs/T)) [B]; T scalar or [B]."""
    if isinstance(T, Tensor) and T.dim() == 1:
        T = T[:, None]
    log_p = F.log_softmax(_acc(z_mentor) / T, dim=1)
    log_q = F.log_softmax(_acc(z_student) / T, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def l_distill(z_mentor: Tensor, z_student: Tensor, T: float) -> Tensor:
    """T^2 * KL_batchmean(softmax(zm/T) || softmax(zs/T)) (docs/METHODS.md)."""
    return T * T * kl_rows(z_mentor, z_student, T).mean()


def ce_rows(z: Tensor, labels: Tensor) -> Tensor:
    """Per-sample cross-entropy [B] as logsumexp - z_y (the form the kernel uses)."""
    z = _acc(z)
    return torch.logsumexp(z, dim=1) - z.gather(1, labels[:, None]).squeeze(1)


def _stats(
    M: int, device: torch.device, rank=None, active=None, temp=None, student=1.0, flag=None
) -> Stats:
    f32 = dict(device=device, dtype=torch.float32)
    return {
        "mentor_rank": torch.zeros(M, **f32) if rank is None else rank.float(),
        "mentor_active": torch.zeros(M, **f32) if active is None else active.float(),
        "mentor_temp": torch.ones(M, **f32) if temp is None else temp.float(),
        "student_rank": torch.as_tensor(student, **f32).reshape(()),
        "nonfinite": flag if flag is not None else torch.zeros((), dtype=torch.int32),
    }


def _mentor_list(mentor_logits: Tensor | None) -> list[Tensor]:
    return [] if mentor_logits is None else list(mentor_logits.unbind(0))


# ----------------------------------------------------------------------------- baselines
def nokd(student_logits: Tensor, mentor_logits: Tensor | None, labels: Tensor):
    """CE(zs, y); mentors (if any) are ignored."""
    M = 0 if mentor_logits is None else mentor_logits.shape[0]
    loss = ce_rows(student_logits, labels).mean()
    flag = _flag(student_logits, [], labels)
    return loss, _stats(M, student_logits.device, flag=flag)


def kd(student_logits, mentor_logits, labels, *, T, alpha_ce, alpha_kd):
    """Hinton KD with the teacher (mentor 0): alpha_ce * CE + alpha_kd * L_distill(T)."""
    zt = mentor_logits[0]
    loss = alpha_ce * ce_rows(student_logits, labels).mean()
    loss = loss + alpha_kd * l_distill(zt, student_logits, T)
    M, dev = mentor_logits.shape[0], student_logits.device
    one_hot = torch.zeros(M, device=dev)
    one_hot[0] = 1.0
    return loss, _stats(M, dev, one_hot * alpha_kd, one_hot, one_hot * (T - 1) + 1,
                        alpha_ce, _flag(student_logits, [zt], labels))


def aver(student_logits, mentor_logits, labels, *, tau):
    """AVER (Eq. 12): CE + sum_m L_distill(zm, zs; tau), every mentor, equal weights."""
    loss = ce_rows(student_logits, labels).mean()
    for zm in _mentor_list(mentor_logits):
        loss = loss + l_distill(zm, student_logits, tau)
    M, dev = mentor_logits.shape[0], student_logits.device
    ones = torch.ones(M, device=dev)
    return loss, _stats(M, dev, ones, ones, ones * tau, 1.0,
                        _flag(student_logits, _mentor_list(mentor_logits), labels))


def dgkd(student_logits, mentor_logits, labels, *, tau, p, seed, step):
    """Random mentor drop: each mentor dropped w.p. p (keyed by seed, step, mentor), the
    kept ones averaged: CE + (1/K) sum_{kept} L_distill(zm, zs; tau).

    [choice] if every mentor is dropped the teacher (mentor 0) is kept."""
    M, dev = mentor_logits.shape[0], student_logits.device
    keep = dgkd_keep_mask(seed, step, M, p)
    kept = [m for m in range(M) if keep[m]]
    loss = ce_rows(student_logits, labels).mean()
    for m in kept:
        loss = loss + l_distill(mentor_logits[m], student_logits, tau) / len(kept)
    act = torch.tensor(keep, device=dev, dtype=torch.float32)
    return loss, _stats(M, dev, act / len(kept), act, act * (tau - 1) + 1, 1.0,
                        _flag(student_logits, [mentor_logits[m] for m in kept], labels))


def tekap(student_logits, mentor_logits, labels, *, T, a, n_copies, lam_clean, lam_noisy,
          alpha_ce, seed, step):
    """TeKAP, logit level, teacher only: copies z_i = a * eta_i + (1 - a) * z with
    eta ~ N(0, 1) from `tekap_noise(seed, step, ...)`; loss = alpha_ce * CE +
    lam_clean * L_distill(z, zs; T) + lam_noisy * sum_i L_distill(z_i, zs; T)."""
    zt = _acc(mentor_logits[0])
    B, C = zt.shape
    eta = tekap_noise(seed, step, B, C, n_copies, device=zt.device, dtype=zt.dtype)
    loss = alpha_ce * ce_rows(student_logits, labels).mean()
    loss = loss + lam_clean * l_distill(zt, student_logits, T)
    for i in range(n_copies):
        loss = loss + lam_noisy * l_distill(a * eta[i] + (1.0 - a) * zt, student_logits, T)
    M, dev = mentor_logits.shape[0], student_logits.device
    one_hot = torch.zeros(M, device=dev)
    one_hot[0] = 1.0
    weight = one_hot * (lam_clean + n_copies * lam_noisy)
    return loss, _stats(M, dev, weight, one_hot, one_hot * (T - 1) + 1, alpha_ce,
                        _flag(student_logits, [mentor_logits[0]], labels))


def dkd(student_logits, mentor_logits, labels, *, T, alpha_ce, dkd_alpha, dkd_beta, warmup,
        epoch):
    """Decoupled KD with the teacher: alpha_ce * CE + min(epoch/warmup, 1) *
    (dkd_alpha * TCKD + dkd_beta * NCKD), both scaled by T^2 and averaged over the batch.
    `epoch` counts from 1 as in mdistiller's trainer (the first epoch has 1/warmup);
    `epoch=None` means past the warm-up (factor 1). The non-target distributions exclude
    the target class exactly (the DKD code subtracts 1000 from it: same to e^-1000)."""
    zs, zt = _acc(student_logits), _acc(mentor_logits[0])
    gt = F.one_hot(labels, zs.shape[1]).bool()
    log_ps, log_pt = F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1)
    # binary (target, rest) distributions; log(1 - p_y) from the non-target logsumexp
    lse_s, lse_t = torch.logsumexp(zs / T, 1), torch.logsumexp(zt / T, 1)
    nt_s = torch.logsumexp((zs / T).masked_fill(gt, float("-inf")), 1)
    nt_t = torch.logsumexp((zt / T).masked_fill(gt, float("-inf")), 1)
    bin_s = torch.stack([log_ps[gt], nt_s - lse_s], 1)
    bin_t = torch.stack([log_pt[gt], nt_t - lse_t], 1)
    tckd = (bin_t.exp() * (bin_t - bin_s)).sum(1)
    lq_s = F.log_softmax((zs / T).masked_fill(gt, float("-inf")), 1)
    lq_t = F.log_softmax((zt / T).masked_fill(gt, float("-inf")), 1)
    nckd = torch.where(gt, 0.0, lq_t.exp() * (lq_t - lq_s)).sum(1)
    warm = 1.0 if epoch is None else min(epoch / warmup, 1.0)
    kd_term = warm * T * T * (dkd_alpha * tckd + dkd_beta * nckd).mean()
    loss = alpha_ce * ce_rows(student_logits, labels).mean() + kd_term
    M, dev = mentor_logits.shape[0], student_logits.device
    one_hot = torch.zeros(M, device=dev)
    one_hot[0] = 1.0
    return loss, _stats(M, dev, one_hot * warm, one_hot, one_hot * (T - 1) + 1, alpha_ce,
                        _flag(student_logits, [mentor_logits[0]], labels))


# ----------------------------------------------------------------------------- ClassroomKD
@torch.no_grad()
def classroom_weights(ce: Tensor, *, tau: float, beta: float, delta: float, lam: float | None,
                      variant: str, granularity: str) -> dict[str, Tensor]:
    """Ranks, gate, temperatures and loss weights from per-sample CE [K=1+M, B] (row 0 the
    student), detached. Shared by the reference and the fused path (which computes `ce`
    in a first kernel pass), so both apply identical selection arithmetic.

    Returns `w_kl [M, B]` (weight of each mentor's T^2*KL per sample, 0 if inactive),
    `temp [M, B]`, `w_ce [B]`, and the logged `r_s [B]`, `r_m [M, B]`, `active [M, B]`.
    At batch granularity every [., B] tensor is a broadcast [., 1] expanded to B.

    paper:    score g_k = softmax(z_k)[y] (batch: mean over b), r_k = lam * g_k / sum g,
              active iff r_m > r_s, tau_m = 1 + tau (r_m - r_s) / r_m,
              w_kl = beta * r_m, w_ce = r_s + delta (delta's KL term added by the caller).
    official: score = exp(-CE) (batch: exp(-mean_b CE), the geometric mean of g),
              r_k = round(score_k / sum, 2) * M, gate r_m >= r_s, T_m as above (1 if
              r_m = 0), w_kl = r_m, w_ce = raw student score; beta, delta not applied.
              Sample granularity [choice]: the same per sample with score = g_k[b].
    """
    K, B = ce.shape
    M = K - 1
    ce = ce.float()
    if variant == "paper":
        score = torch.exp(-ce)
        if granularity == "batch":
            score = score.mean(1, keepdim=True)
    elif variant == "official":
        score = torch.exp(-(ce.mean(1, keepdim=True) if granularity == "batch" else ce))
    else:
        raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
    total = score[0]
    for k in range(1, K):  # fixed summation order: the fused path does the same
        total = total + score[k]
    frac = torch.where(total > 0, score / total, torch.zeros_like(score))
    if variant == "paper":
        r = (float(M) if lam is None else float(lam)) * frac
        r_s, r_m = r[0], r[1:]
        active = r_m > r_s
        w_kl = torch.where(active, beta * r_m, 0.0)
        w_ce = r_s + delta
    else:
        r = torch.round(frac * 100.0) / 100.0 * float(M if lam is None else lam)
        r_s, r_m = r[0], r[1:]
        active = r_m >= r_s
        w_kl = torch.where(active, r_m, 0.0)
        w_ce = score[0]
    safe_rm = torch.where(r_m > 0, r_m, torch.ones_like(r_m))
    temp = torch.where(active & (r_m > 0), 1.0 + tau * (r_m - r_s) / safe_rm, 1.0)
    out = dict(w_kl=w_kl, temp=temp, w_ce=w_ce, r_s=r_s, r_m=r_m, active=active)
    return {k: v.expand(*v.shape[:-1], B) for k, v in out.items()}


def classroom_stats(cw: dict[str, Tensor], flag: Tensor) -> Stats:
    """Per-mentor means over samples of the selection signals (see module docstring)."""
    act = cw["active"].float()
    n_act = act.sum(1)
    temp = torch.where(n_act > 0, (cw["temp"] * act).sum(1) / n_act.clamp_min(1.0), 1.0)
    return _stats(act.shape[0], act.device, cw["r_m"].mean(1), act.mean(1), temp,
                  cw["r_s"].mean(), flag)


def classroom(student_logits, mentor_logits, labels, *, tau, beta, delta, lam, variant,
              granularity, rank_logits=None):
    """ClassroomKD (docs/METHODS.md, or the authors' code with variant='official').

    `rank_logits` (default: the student logits, detached) are the student logits used for
    ranking only; a fixed tensor there holds the selection constant (for gradcheck)."""
    if granularity not in ("batch", "sample"):
        raise ValueError(f"granularity must be 'batch' or 'sample', got {granularity!r}")
    zs = _acc(student_logits)
    rank_zs = zs if rank_logits is None else _acc(rank_logits)
    models = [rank_zs.detach()] + _mentor_list(mentor_logits)
    ce = torch.stack([ce_rows(z, labels) for z in models])  # [K, B], detached inputs
    cw = classroom_weights(ce.detach(), tau=tau, beta=beta, delta=delta, lam=lam,
                           variant=variant, granularity=granularity)
    per_sample = cw["w_ce"] * ce_rows(zs, labels)
    for m, zm in enumerate(_mentor_list(mentor_logits)):
        T = cw["temp"][m]
        term = cw["w_kl"][m] * T * T * kl_rows(zm, zs, T)
        per_sample = per_sample + torch.where(cw["w_kl"][m] != 0, term, 0.0)
    loss = per_sample.mean()
    if variant == "paper" and delta != 0.0:  # Eq. 11; delta's CE part is inside w_ce
        loss = loss + delta * l_distill(mentor_logits[0], zs, 1.0)
    flag = _flag(student_logits, _mentor_list(mentor_logits), labels)
    return loss, classroom_stats(cw, flag)


"""Eager reference of the distillation losses on sparse mentors (`SparseMentors`): the
contract the sparse Triton kernels are tested against. docs/SPARSE.md states the math.

Each mentor m and inverse temperature t = 1/T define a *target* over the row's slots i
(weights w_i, summing with the rest mass to 1, and log-probs l_i used in the loss value)
and, for top-k mentors, a rest bucket (mass p_r) holding every class not in the row:

- topk: a_i = t z_i, a_r = log R(t) (the rest's tempered mass, `rest_log_mass`), L =
  logsumexp(a, a_r); w_i = exp(a_i - L) = l_i's exp, p_r = exp(a_r - L). Exact at T=1
  (R(1) is stored), an estimate at T != 1.
- sample: g_i = log c_i + z_i (t - 1) (self-normalized importance weights of the draws
  from softmax(z) towards softmax(z/T)); w_i = softmax(g)_i; log Z_T estimated as
  lse_1 + logsumexp(g) - log S, l_i = t z_i - that. At T=1, w = counts / S and l_i =
  log p_i exactly: the value and the gradient are unbiased. At T != 1 both are
  self-normalized estimates (consistent as S grows, biased for finite S).

With the student's q = softmax(t zs) and q_r = the mass of the classes not in the row:

    KL_m = sum_i w_i (l_i - log q_{id_i}) + p_r (log p_r - log q_r)

(the KL between the K+1-bucket coarsenings at T=1 for topk), and the loss uses T^2 KL_m
where dense uses T^2 KL(softmax(zm/T) || softmax(zs/T)), with the methods' weights
unchanged. Its gradient is T (q_j - w_{slot(j)} - [j in rest] q_j p_r / q_r).
ClassroomKD ranks from the stored exact true-class log-prob.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckd.kernels import reference as ref
from ckd.kernels.rng import tekap_noise
from ckd.kernels.sparse_mentors import SparseMentors

REST_MODELS = ("moment", "equal")
REST_MODEL = "moment"  # measured against dense: docs/SPARSE.md, benchmarks/sparse.py


def rest_log_mass(rest_lse: Tensor, rest_mean: Tensor, n_rest: Tensor, t: Tensor | float,
                  model: str = REST_MODEL, noise_a: float = 0.0) -> Tensor:
    """log sum_{j in rest} exp(t z_j) estimated from the rest's n classes, logsumexp r
    (at t = 1) and mean logit mu. f(t) = log sum exp(t z_j) is convex with f(0) = log n,
    f'(0) = mu, f(1) = r, all known:

    - 'moment': f(t) ~ log n + mu t + c t^2 with c = r - log n - mu, the quadratic through
      all three facts (exact when the rest logits are Gaussian-distributed; exact at t=1).
    - 'equal': f(t) ~ log n + (r - log n) t, the chord: as if the n rest logits were equal
      (an upper bound for T > 1 by convexity).

    `noise_a` (TeKAP's noisy copies a*eta + (1-a) z): rest logits scaled by 1-a and the
    noise replaced by its expectation E exp(t a eta) = exp(t^2 a^2 / 2).
    """
    if model not in REST_MODELS:
        raise ValueError(f"rest model must be one of {REST_MODELS}, got {model!r}")
    log_n = torch.log(n_rest.to(rest_lse.dtype))
    s = t * (1.0 - noise_a)
    if model == "moment":
        f = log_n + rest_mean * s + (rest_lse - log_n - rest_mean) * s * s
    else:
        f = log_n + (rest_lse - log_n) * s
    f = f + 0.5 * (noise_a * t) ** 2
    return torch.where((n_rest > 0) & (rest_lse > float("-inf")), f, float("-inf"))


def mentor_target(sm: SparseMentors, m: int, t: Tensor, eta: Tensor | None = None,
                  noise_a: float = 0.0, rest_model: str = REST_MODEL):
    """(w [B, K], l [B, K], log p_r [B]) of mentor m at inverse temperature t ([B, 1]).
    `eta` [B, K]: TeKAP noise at the row's ids (the copy a*eta + (1-a) z)."""
    z = ref._acc(sm.logits[m])
    real = sm.counts[m] > 0
    zt = z if eta is None else noise_a * eta.to(z.dtype) + (1.0 - noise_a) * z
    ninf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    if sm.modes[m] == "sample":
        g = torch.where(real, torch.log(sm.counts[m].to(z.dtype).clamp_min(1)) + zt * t - z,
                        ninf)
        lse_g = torch.logsumexp(g, 1, keepdim=True)
        draws = sm.counts[m].to(z.dtype).sum(1, keepdim=True)
        log_zt = sm.lse[m].to(z.dtype)[:, None] + lse_g - torch.log(draws)
        w = torch.exp(g - lse_g)
        return w, zt * t - log_zt, torch.full_like(log_zt[:, 0], float("-inf"))
    a = torch.where(real, zt * t, ninf)
    n_rest = sm.num_classes - real.sum(1)
    a_r = rest_log_mass(sm.rest_lse[m].to(z.dtype), sm.rest_mean[m].to(z.dtype), n_rest,
                        t[:, 0], rest_model, noise_a)
    L = torch.logsumexp(torch.cat([a, a_r[:, None]], 1), 1, keepdim=True)
    return torch.exp(a - L), a - L, a_r - L[:, 0]


def sparse_kl_rows(sm: SparseMentors, m: int, zs: Tensor, T: Tensor | float,
                   eta: Tensor | None = None, noise_a: float = 0.0,
                   rest_model: str = REST_MODEL) -> Tensor:
    """Per-sample KL_m [B] (module docstring) at temperature T (scalar or [B])."""
    zs = ref._acc(zs)
    B = zs.shape[0]
    T = torch.as_tensor(T, dtype=zs.dtype, device=zs.device).expand(B)[:, None]
    t = 1.0 / T
    w, lp, lp_r = mentor_target(sm, m, t, eta, noise_a, rest_model)
    logq = torch.log_softmax(zs * t, 1)
    real = sm.counts[m] > 0
    ids = _safe_ids(sm, m)
    # int32, not bool: CUDA's scatter_reduce has no bool kernel
    member = torch.zeros_like(zs, dtype=torch.int32).scatter_reduce(
        1, ids, real.to(torch.int32), "amax") > 0
    logq_r = torch.logsumexp(logq.masked_fill(member, float("-inf")), 1)
    slot = torch.where(w > 0, w * (lp - logq.gather(1, ids)), 0.0).sum(1)
    rest = torch.where(lp_r > float("-inf"), lp_r.exp() * (lp_r - logq_r), 0.0)
    return slot + rest


def _safe_ids(sm: SparseMentors, m: int) -> Tensor:
    """Mentor m's ids [B, K] as int64, out-of-range ones at 0 (they are flagged)."""
    ids = sm.ids[m].long()
    return torch.where((ids >= 0) & (ids < sm.num_classes), ids, 0)


def _l_distill(sm, m, zs, T, **kw) -> Tensor:
    return T * T * sparse_kl_rows(sm, m, zs, T, **kw).mean()


def _flag(zs: Tensor, sm: SparseMentors, mentors: list[int], labels: Tensor) -> Tensor:
    flag = (~torch.isfinite(zs)).any().to(torch.int32) * ref.FLAG_STUDENT
    for m in mentors:
        real = sm.counts[m] > 0
        bad = (real & ~torch.isfinite(sm.logits[m].float())).any()
        bad |= (real & ((sm.ids[m] < 0) | (sm.ids[m] >= sm.num_classes))).any()
        bad |= (sm.counts[m] < 0).any()
        bad |= (~torch.isfinite(sm.lse[m]) | ~torch.isfinite(sm.true_logp[m])).any()
        bad |= (torch.isnan(sm.rest_lse[m]) | (sm.rest_lse[m] == float("inf"))).any()
        flag = flag | bad.to(torch.int32) * ref.FLAG_MENTOR
    bad_y = ((labels < 0) | (labels >= zs.shape[1])).any().to(torch.int32) * ref.FLAG_LABEL
    return flag | bad_y


def _one_hot(M: int, dev) -> Tensor:
    v = torch.zeros(M, device=dev)
    v[0] = 1.0
    return v


def kd(zs, sm, labels, *, T, alpha_ce, alpha_kd):
    loss = alpha_ce * ref.ce_rows(zs, labels).mean() + alpha_kd * _l_distill(sm, 0, zs, T)
    M, dev = sm.shape[0], zs.device
    oh = _one_hot(M, dev)
    return loss, ref._stats(M, dev, oh * alpha_kd, oh, oh * (T - 1) + 1, alpha_ce,
                            _flag(zs, sm, [0], labels))


def aver(zs, sm, labels, *, tau):
    M, dev = sm.shape[0], zs.device
    loss = ref.ce_rows(zs, labels).mean()
    for m in range(M):
        loss = loss + _l_distill(sm, m, zs, tau)
    ones = torch.ones(M, device=dev)
    return loss, ref._stats(M, dev, ones, ones, ones * tau, 1.0,
                            _flag(zs, sm, list(range(M)), labels))


def dgkd(zs, sm, labels, *, tau, p, seed, step):
    M, dev = sm.shape[0], zs.device
    keep = ref.dgkd_keep_mask(seed, step, M, p)
    kept = [m for m in range(M) if keep[m]]
    loss = ref.ce_rows(zs, labels).mean()
    for m in kept:
        loss = loss + _l_distill(sm, m, zs, tau) / len(kept)
    act = torch.tensor(keep, device=dev, dtype=torch.float32)
    return loss, ref._stats(M, dev, act / len(kept), act, act * (tau - 1) + 1, 1.0,
                            _flag(zs, sm, kept, labels))


def tekap_noise_at(seed: int, step: int, ids: Tensor, n_copies: int,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """TeKAP's eta[copy, b, class] (rng.tekap_noise, in `dtype`) at the row's ids [B, K]."""
    B = ids.shape[0]
    eta = tekap_noise(seed, step, B, int(ids.max()) + 1 if ids.numel() else 1, n_copies,
                      device=ids.device, dtype=dtype)
    return eta.gather(2, ids.long()[None].expand(n_copies, -1, -1))


def tekap(zs, sm, labels, *, T, a, n_copies, lam_clean, lam_noisy, alpha_ce, seed, step):
    """Noisy copies a*eta + (1-a) z at the stored ids (the same eta as dense TeKAP at those
    classes); a top-k copy's rest bucket from `rest_log_mass(noise_a=a)`."""
    loss = alpha_ce * ref.ce_rows(zs, labels).mean() + lam_clean * _l_distill(sm, 0, zs, T)
    eta = tekap_noise_at(seed, step, _safe_ids(sm, 0), n_copies, ref._acc(sm.logits[:0]).dtype)
    for i in range(n_copies):
        loss = loss + lam_noisy * _l_distill(sm, 0, zs, T, eta=eta[i], noise_a=a)
    M, dev = sm.shape[0], zs.device
    oh = _one_hot(M, dev)
    return loss, ref._stats(M, dev, oh * (lam_clean + n_copies * lam_noisy), oh,
                            oh * (T - 1) + 1, alpha_ce, _flag(zs, sm, [0], labels))


def classroom(zs, sm, labels, *, tau, beta, delta, lam, variant, granularity,
              rank_logits=None):
    """ClassroomKD with each mentor's CE = -true_logp (exact, stored), so ranks, gates and
    temperatures equal the dense cache's; the KL terms are the sparse KL_m."""
    zs_a = ref._acc(zs)
    rank_zs = zs_a if rank_logits is None else ref._acc(rank_logits)
    ce = torch.cat([ref.ce_rows(rank_zs.detach(), labels)[None],
                    -sm.true_logp.to(zs_a.dtype)])
    cw = ref.classroom_weights(ce.detach(), tau=tau, beta=beta, delta=delta, lam=lam,
                               variant=variant, granularity=granularity)
    per_sample = cw["w_ce"] * ref.ce_rows(zs_a, labels)
    for m in range(sm.shape[0]):
        T = cw["temp"][m]
        term = cw["w_kl"][m] * T * T * sparse_kl_rows(sm, m, zs_a, T)
        per_sample = per_sample + torch.where(cw["w_kl"][m] != 0, term, 0.0)
    loss = per_sample.mean()
    if variant == "paper" and delta != 0.0:
        loss = loss + delta * _l_distill(sm, 0, zs_a, 1.0)
    return loss, ref.classroom_stats(cw, _flag(zs, sm, list(range(sm.shape[0])), labels))


def nokd(zs, sm, labels):
    M = 0 if sm is None else sm.shape[0]
    return ref.ce_rows(zs, labels).mean(), ref._stats(M, zs.device,
                                                      flag=ref._flag(zs, [], labels))

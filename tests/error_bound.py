"""Tolerances of the kernel tests, derived from a written-down rounding-error bound
(docs/METHODS.md, "Rounding contract").

Both the fused kernels and the eager reference evaluate the same expression in the
accumulation precision (u = 2^-24 in fp32, 2^-53 in fp64). Each is held to its own bound
against the float64 value of the same inputs; the two are then within the sum of their
bounds of each other. Per row b the bound counts, with gamma_C = ceil(log2 C) + 6:

- a log-probability lp_c = a_c - log d, a_c = (z_c - max z) / T, d = sum_c exp(a_c):
  the shift, the scale by 1/T (itself rounded), exp and log (within 2 ulps in libdevice
  and in torch), the normalizer's sum of C positive terms (a tree: ceil(log2 C) roundings
  per element, the order of torch's cascaded sums too) and the product with p:
  |d lp_c| <= gamma_C u (|a_c| + |log d|), with |a_c| <= spread / T (spread = max z -
  min z of the row) and 0 <= log d <= log C;
- a term w T^2 KL(p || q) = w T^2 sum_c p_c (lp_c - lq_c), summed with weights p that sum
  to 1: |d term| <= gamma_C u w T^2 ((spread_p + spread_q) / T + 2 log C)
                 = gamma_C u w (T (spread_p + spread_q) + 2 T^2 log C);
- the CE term w_ce (log d_s + max zs - zs_y): |d| <= gamma_C u w_ce (|max zs - zs_y| + log C);
- the batch mean of the rows: ceil(log2 B) + 1 roundings of a sum of |loss_b|.

The term weights and temperatures are upper bounds read from the term table the method
declares (`term_bounds`): a ranked mentor has r_m <= lam and T_m <= 1 + tau. The bound
grows with T^2: at T = 13 one ulp of a log-normalizer of magnitude log C is 169 ulps of
the loss, which is what the reference and the kernel really differ by at large C.

A gradient element (1/B)(w_ce (s_c - [c = y]) + sum_j w_j T_j (q_jc - p_jc)) has
probabilities within gamma_C u (1 + log C) of their value (exp(a) |a| <= 1 for a <= 0), so
|d g_c| <= gamma_C u (1 + log C) (w_ce + 2 sum_j w_j T_j) / B, plus one rounding to the
student's dtype.

Selection statistics (ranks, temperatures) are functions of the per-row CE keys; a key's
error gamma_C u (|CE| + log C) becomes a relative error of the score exp(-CE), doubled by
the ratio score / total, plus ceil(log2 B) + 1 roundings of the batch mean (`stats_rtol`).
"""

from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24
U64 = 2.0 ** -53
NOISE_SPREAD = 2 * math.sqrt(-2 * math.log(2.0 ** -24))  # TeKAP's eta: |eta| <= 5.77


def unit(student_dtype: torch.dtype) -> float:
    return U64 if student_dtype == torch.float64 else U32


def gamma(C: int) -> int:
    return math.ceil(math.log2(C)) + 6


def term_bounds(method: str, params: dict, M: int) -> tuple[float, list[tuple[int, float,
                                                                             float, float]]]:
    """(w_ce upper bound, [(mentor, weight bound, temperature bound, extra spread)]) of a
    registered method's loss, read from the term table its declaration builds."""
    from ckd.kernels.terms import Decoupled, RandomDrop, Ranking
    from ckd.methods.registry import get_method

    table = get_method(method).terms(params, M)
    if isinstance(table, Decoupled):  # TCKD and NCKD: two KL terms of the teacher at T
        return table.alpha_ce, [(0, table.w_target, table.T, 0.0),
                                (0, table.w_nontarget, table.T, 0.0)]
    sel = table.select
    if isinstance(sel, Ranking):  # r_m <= lam, T_m <= 1 + tau, official w_ce <= 1
        w = sel.lam if sel.official else sel.beta * sel.lam
        terms = [(m, w, 1.0 + sel.tau, 0.0) for m in range(M)]
        if sel.delta_term:
            terms.append((0, sel.delta, 1.0, 0.0))
        return (1.0 if sel.official else sel.lam + sel.delta), terms
    if isinstance(sel, RandomDrop):  # weights 1 / |kept| <= 1
        return table.w_ce, [(m, 1.0, sel.tau, 0.0) for m in table.src]
    return table.w_ce, [(m, w, T, table.noise_a * NOISE_SPREAD if c >= 0 else 0.0)
                        for m, w, T, c in zip(table.src, table.weight, table.temp,
                                              table.copies, strict=True)]


def _spread(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z.max(-1).values - z.min(-1).values


def sparse_spread(sm) -> torch.Tensor:
    """[M, B] spread of a sparse mentor row's log-weights at T = 1: its stored slot logits
    and the rest bucket's per-class log-mass (between the rest's mean logit and its
    logsumexp less log n), the buckets its target distribution is over."""
    real = sm.counts > 0
    z = sm.logits.double()
    hi = torch.where(real, z, -torch.inf).max(-1).values
    lo = torch.where(real, z, torch.inf).min(-1).values
    n_rest = (sm.num_classes - real.sum(-1)).clamp_min(1).double()
    has_rest = torch.isfinite(sm.rest_lse.double())
    per_class = sm.rest_lse.double() - torch.log(n_rest)
    for v in (sm.rest_mean.double(), per_class):
        hi = torch.where(has_rest, torch.maximum(hi, v), hi)
        lo = torch.where(has_rest, torch.minimum(lo, v), lo)
    return hi - lo


def loss_bound(zs, zm, y, method: str, params: dict, loss: float) -> float:
    """Bound on |loss computed in the accumulation precision - loss in exact arithmetic|.
    `zm`: dense mentor logits [M, B, C] or `SparseMentors` (spreads from `sparse_spread`)."""
    M = 0 if zm is None else zm.shape[0]
    w_ce, terms = term_bounds(method, params, M)
    spreads = None if zm is None else \
        _spread(zm) if isinstance(zm, torch.Tensor) else sparse_spread(zm)
    return terms_bound(zs, spreads, y, w_ce, terms, loss)


def terms_bound(zs, spreads, y, w_ce: float, terms, loss: float) -> float:
    """The bound of `loss_bound` for explicit terms [(mentor, weight, temperature, extra
    spread)] and mentor row spreads [M, B]."""
    B, C = zs.shape
    zs64 = zs.detach().double()
    logc = math.log(C)
    ce_part = (zs64.max(1).values - zs64.gather(1, y.long()[:, None])[:, 0]).abs() + logc
    rows = w_ce * ce_part
    s_spread = _spread(zs64)
    noise = 0.0
    u = unit(zs.dtype)
    for m, w, T, extra in terms:
        rows = rows + w * (T * (spreads[m] + extra + s_spread) + 2 * T * T * logc)
        # TeKAP's eta is Box-Muller in the accumulation precision on both sides (log, cos
        # within 2 ulps each)
        noise += w * T * 2 * u * extra
    return float(gamma(C) * u * rows.mean() + (math.ceil(math.log2(B)) + 1) * u * abs(loss)
                 + noise)


def terms_grad_bound(zs, w_ce: float, terms) -> float:
    """Bound on the max abs error of a gradient element (before the student-dtype
    rounding, which the caller adds)."""
    B, C = zs.shape
    weight = w_ce + 2 * sum(w * T for _m, w, T, _e in terms)
    return gamma(C) * unit(zs.dtype) * (1 + math.log(C)) * weight / B


def grad_bound(zs, zm, method: str, params: dict) -> float:
    """`terms_grad_bound` of a method's terms."""
    return terms_grad_bound(zs, *term_bounds(method, params, 0 if zm is None else zm.shape[0]))


def stats_rtol(zs, zm, y) -> float:
    """Relative tolerance of the selection statistics (ranks, temperatures, CE weights)
    between two evaluations whose per-row CE keys each carry the error above."""
    from ckd.kernels.reference import ce_rows

    B, C = zs.shape
    ce = [ce_rows(zs.detach(), y)] + ([] if zm is None else [ce_rows(z, y) for z in zm])
    key = max(float(c.abs().max()) for c in ce) + math.log(C)
    u = unit(zs.dtype)
    # two sides, score ratio (x2), then the temperature 1 + tau (r_m - r_s) / r_m (x2)
    return 8 * gamma(C) * u * key + 2 * (math.ceil(math.log2(B)) + 1) * u

"""The eager reference (ckd.kernels.reference) against independent textbook formulas,
gradcheck in float64, the counter-based RNG and the API's input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ckd.hashing import mix32, mix32_int
from ckd.kernels import (
    DistillOutput,
    NonFiniteError,
    check_finite,
    dgkd_keep_mask,
    tekap_noise,
)
from ckd.methods import distill_loss, get_method


def inputs(B=8, C=10, M=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, C, generator=g, dtype=dtype).requires_grad_()
    zm = (2 * torch.randn(M, B, C, generator=g)).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return zs, zm, y


def ref(method, *args, **kw):
    """The eager reference of `method` with its declared defaults for what `kw` omits."""
    return get_method(method).run_reference(*args, **kw)


def hinton(zm, zs, T):
    """T^2 * KL batchmean the way everybody writes it."""
    return F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zm / T, 1), reduction="batchmean") * T**2


def close(a, b, tol=1e-5):
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


# ----------------------------------------------------------------------------- formulas
def test_nokd_kd_aver_match_torch_formulas():
    zs, zm, y = inputs()
    close(ref("nokd", zs, zm, y)[0], F.cross_entropy(zs, y))
    close(ref("kd", zs, zm, y, T=4.0, alpha_ce=0.1, alpha_kd=0.9)[0],
          0.1 * F.cross_entropy(zs, y) + 0.9 * hinton(zm[0], zs, 4.0))
    expect = F.cross_entropy(zs, y) + sum(hinton(zm[m], zs, 7.0) for m in range(3))
    close(ref("aver", zs, zm, y, tau=7.0)[0], expect)


def _paper_by_hand(zs, zm, y, tau, beta, delta, lam):
    """Eq. 1-11 written out with python loops over the classroom."""
    models = [zs.detach()] + list(zm)
    w = [F.softmax(z, 1).gather(1, y[:, None]).mean() for z in models]
    r = [lam * wk / sum(w) for wk in w]
    loss = r[0] * F.cross_entropy(zs, y)
    active = []
    for m in range(len(zm)):
        if r[m + 1] > r[0]:
            t = float(1 + tau * (r[m + 1] - r[0]) / r[m + 1])
            loss = loss + beta * r[m + 1] * hinton(zm[m], zs, t)
            active.append(m)
    loss = loss + delta * (F.cross_entropy(zs, y) + hinton(zm[0], zs, 1.0))
    return loss, active


@pytest.mark.parametrize("tau,beta,delta", [(12.0, 1.0, 0.0), (4.0, 0.5, 1.0)])
def test_classroom_paper_batch_by_hand(tau, beta, delta):
    zs, zm, y = inputs(M=4, seed=3)
    zm[1] = zm[1] * 0.1 + 3 * F.one_hot(y, 10)  # a good peer: at least one mentor active
    loss, stats = ref("classroom", zs, zm, y, tau=tau, beta=beta, delta=delta)
    expect, active = _paper_by_hand(zs, zm, y, tau, beta, delta, lam=4.0)
    close(loss, expect)
    assert active and stats["mentor_active"].nonzero().flatten().tolist() == active


def test_classroom_official_batch_matches_authors_code():
    zs, zm, y = inputs(M=3, seed=5)
    zm[2] = zm[2] * 0.1 + 4 * F.one_hot(y, 10)
    score = [torch.exp(-F.cross_entropy(z, y)) for z in [zs.detach()] + list(zm)]
    norm = [round(float(s / sum(score)), 2) * 3 for s in score]
    expect = score[0] * F.cross_entropy(zs, y)
    gated = []
    for m in range(3):
        if norm[m + 1] >= norm[0]:
            t = 1 + 12.0 * (norm[m + 1] - norm[0]) / norm[m + 1] if norm[m + 1] else 1.0
            expect = expect + norm[m + 1] * hinton(zm[m], zs, t)
            gated.append(m)
    loss, stats = ref("classroom", zs, zm, y, variant="official", beta=3.0, delta=2.0)
    close(loss, expect)
    assert gated and stats["mentor_active"].nonzero().flatten().tolist() == gated


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_sample_granularity_is_batch_of_one_averaged(variant):
    zs, zm, y = inputs(B=6, M=3, seed=7)
    loss, _ = ref("classroom", zs, zm, y, variant=variant, granularity="sample", delta=0.3)
    per = [ref("classroom", zs[b:b + 1], zm[:, b:b + 1], y[b:b + 1], variant=variant, delta=0.3)[0]
           for b in range(6)]
    close(loss, torch.stack(per).mean())


def test_ties_are_inactive_in_paper_and_gated_in_official():
    zs, zm, y = inputs(M=2, seed=1)
    zm[1] = zs.detach()  # mentor 1 identical to the student: r_m == r_s exactly
    for gran in ("batch", "sample"):
        _, st = ref("classroom", zs, zm, y, granularity=gran)
        assert float(st["mentor_active"][1]) == 0.0
        _, st = ref("classroom", zs, zm, y, variant="official", granularity=gran)
        assert float(st["mentor_active"][1]) == 1.0


def test_dkd_matches_original_code():
    zs, zm, y = inputs(B=6, C=10, M=2, seed=2)
    T, B = 4.0, 6
    gt = F.one_hot(y, 10).float()
    ps, pt = F.softmax(zs / T, 1), F.softmax(zm[0] / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / B
    nckd = F.kl_div(F.log_softmax(zs / T - 1000.0 * gt, 1),
                    F.softmax(zm[0] / T - 1000.0 * gt, 1), reduction="sum") * T**2 / B
    expect = F.cross_entropy(zs, y) + min(5 / 20, 1.0) * (1.0 * tckd + 8.0 * nckd)
    close(ref("dkd", zs, zm, y, epoch=5)[0], expect)


def test_tekap_uses_keyed_noise():
    zs, zm, y = inputs(M=1, seed=4)
    eta = tekap_noise(9, 3, 8, 10, 3)
    expect = F.cross_entropy(zs, y) + hinton(zm[0], zs, 4.0)
    for i in range(3):
        expect = expect + 0.8 * hinton(0.1 * eta[i] + 0.9 * zm[0], zs, 4.0)
    close(ref("tekap", zs, zm, y, seed=9, step=3)[0], expect)
    assert not torch.equal(ref("tekap", zs, zm, y, seed=9, step=4)[0], expect)


def test_dgkd_mask_and_average():
    assert dgkd_keep_mask(0, 0, 5, 1.0) == [True, False, False, False, False]
    assert all(dgkd_keep_mask(3, s, 4, 0.0) == [True] * 4 for s in range(5))
    drops = [k for s in range(2000) for k in dgkd_keep_mask(1, s, 4, 0.3)[1:]]
    assert abs(1 - sum(drops) / len(drops) - 0.3) < 0.03
    zs, zm, y = inputs(M=4)
    keep = dgkd_keep_mask(2, 11, 4, 0.5)
    kept = [m for m in range(4) if keep[m]]
    expect = F.cross_entropy(zs, y) + sum(hinton(zm[m], zs, 5.0) for m in kept) / len(kept)
    loss, st = ref("dgkd", zs, zm, y, tau=5.0, p=0.5, seed=2, step=11)
    close(loss, expect)
    assert st["mentor_active"].tolist() == [float(k) for k in keep]


def test_rng_hash_and_gaussian():
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789]
    assert mix32(torch.tensor(xs)).tolist() == [mix32_int(x) for x in xs]
    eta = tekap_noise(0, 0, 64, 500, 2)
    assert abs(float(eta.mean())) < 0.01 and abs(float(eta.std()) - 1) < 0.01
    assert torch.equal(eta, tekap_noise(0, 0, 64, 500, 2))
    assert not torch.equal(eta, tekap_noise(1, 0, 64, 500, 2))
    assert float((eta[0] - eta[1]).abs().min()) >= 0 and not torch.equal(eta[0], eta[1])


@pytest.mark.parametrize("method,kw", [
    ("nokd", {}), ("kd", {}), ("aver", {}), ("dgkd", {"step": 1}), ("tekap", {}),
    ("dkd", {"epoch": 3}), ("classroom", {}), ("classroom", {"granularity": "sample"}),
    ("classroom", {"variant": "official"}), ("classroom", {"delta": 1.0}),
])
def test_reference_gradcheck_float64(method, kw):
    zs, zm, y = inputs(B=3, C=5, M=2, seed=11, dtype=torch.float64)
    if method == "classroom":  # hold the (detached) selection fixed while z moves
        kw = {**kw, "rank_logits": zs.detach().clone()}

    def f(z):
        return distill_loss(z, zm, y, method=method, backend="reference", tau=3.0, **kw).loss

    assert torch.autograd.gradcheck(f, (zs,))


# ----------------------------------------------------------------------------- API errors
@pytest.mark.parametrize("bad,match", [
    (dict(method="nosuch"), "unknown method 'nosuch'; valid: "),
    (dict(method="fitnet"), "not a logit method"),
    (dict(student_logits=torch.randn(0, 10)), "empty batch"),
    (dict(student_logits=torch.randn(4, 10, 1)), r"\[B, C\]"),
    (dict(mentor_logits=torch.randn(2, 4, 9)), r"\[M, B, C\] = \[M, 4, 10\]"),
    (dict(mentor_logits=torch.randn(4, 10)), r"\[M, B, C\]"),
    (dict(labels=torch.tensor([0, 1, 2, 10])), r"labels must lie in \[0, 10\)"),
    (dict(labels=torch.tensor([0, 1, -1, 3])), r"labels must lie"),
    (dict(labels=torch.tensor([0, 1, 2])), r"labels must be \[B\]"),
    (dict(labels=torch.zeros(4)), "int64 or int32"),
    (dict(student_logits=torch.randint(0, 3, (4, 10))), "dtype"),
    (dict(mentor_logits=torch.randint(0, 3, (2, 4, 10))), "dtype"),
    (dict(mentor_logits=None), "needs mentor_logits"),
    (dict(variant="authors"), "variant"),
    (dict(granularity="class"), "granularity"),
    (dict(backend="cuda"), "backend"),
    (dict(method="kd", tau_kd=3.0), "takes no parameter"),
])
def test_bad_input_errors(bad, match):
    args = dict(student_logits=torch.randn(4, 10), mentor_logits=torch.randn(2, 4, 10),
                labels=torch.tensor([0, 1, 2, 3]))
    kw = {k: bad.pop(k) for k in list(bad) if k in args}
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        distill_loss(args["student_logits"], args["mentor_logits"], args["labels"],
                     backend=bad.pop("backend", "reference"), **bad)


def test_nokd_without_mentors_and_check_finite():
    zs = torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    out = distill_loss(zs, None, y, method="nokd", backend="reference")
    assert isinstance(out, DistillOutput) and out.stats["mentor_rank"].shape == (0,)
    check_finite(out.stats)
    zm = torch.randn(2, 4, 10)
    zm[1, 2, 3] = float("nan")
    out = distill_loss(zs, zm, y, method="aver", backend="reference")
    with pytest.raises(NonFiniteError, match="mentor logits"):
        check_finite(out.stats)
    zs[0, 0] = float("inf")
    out = distill_loss(zs, zm, y, method="kd", backend="reference")  # kd reads mentor 0 only
    with pytest.raises(NonFiniteError, match="student logits") as e:
        check_finite(out.stats)
    assert "mentor" not in str(e.value)

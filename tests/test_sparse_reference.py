"""The sparse-mentor reference against dense math: exact where the mode is exact (topk with
K = C, and K = C-1 whose rest bucket is one class), unbiased/convergent where it samples,
ranks identical to the dense cache's in every mode."""

import math

import pytest
import torch

from ckd.kernels import reference as ref
from ckd.kernels import sparse_reference as sr
from ckd.kernels.sparse_mentors import (
    bytes_per_row,
    parse_mode,
    sparsify_sample,
    sparsify_topk,
    stack,
)
from ckd.methods import get_method

METHOD_CASES = [("kd", {}), ("kd", {"T": 1.0}), ("aver", {}), ("dgkd", {"step": 3}),
                ("tekap", {}), ("classroom", {}),
                ("classroom", {"variant": "official", "granularity": "sample"}),
                ("classroom", {"delta": 0.5, "granularity": "sample"})]


def _data(M=3, B=16, C=12, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zm = (torch.randn(M, B, C, generator=g) * scale).half()
    zs = torch.randn(B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return zs, zm, y


def _dense(method):
    return get_method(method).run_reference


def _sparse(method):
    return get_method(method).run_sparse_reference


def _loss_grad(fn, zs, mentors, y, **kw):
    zs = zs.clone().requires_grad_(True)
    loss, stats = fn(zs, mentors, y, **kw)
    (grad,) = torch.autograd.grad(loss, zs)
    return loss.detach(), grad, stats


@pytest.mark.parametrize("method,kw", METHOD_CASES)
@pytest.mark.parametrize("drop", [0, 1])
def test_topk_exact_when_rest_has_at_most_one_class(method, kw, drop):
    zs, zm, y = _data()
    C = zm.shape[2]
    if method == "tekap" and drop:
        pytest.skip("a noisy copy's rest bucket uses the noise's expectation: exact at K=C only")
    sm = sparsify_topk(zm, y, C - drop)
    l_d, g_d, s_d = _loss_grad(_dense(method), zs, zm, y, **kw)
    l_s, g_s, s_s = _loss_grad(_sparse(method), zs, sm, y, **kw)
    torch.testing.assert_close(l_s, l_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_s, g_d, rtol=1e-5, atol=1e-6)
    for key in s_d:
        torch.testing.assert_close(s_s[key].float(), s_d[key].float())


@pytest.mark.parametrize("spec", ["topk:2", "sample:3"])
@pytest.mark.parametrize("variant,gran", [("paper", "batch"), ("official", "sample")])
def test_classroom_ranks_equal_dense_in_every_mode(spec, variant, gran):
    zs, zm, y = _data(M=4, B=32, C=20, seed=1)
    sm = sparsify_topk(zm, y, 2) if spec.startswith("topk") else \
        sparsify_sample(zm, y, 3, torch.Generator().manual_seed(0))
    _, s_d = _dense("classroom")(zs, zm, y, variant=variant, granularity=gran)
    _, s_s = _sparse("classroom")(zs, sm, y, variant=variant, granularity=gran)
    for key in ("mentor_rank", "mentor_active", "mentor_temp", "student_rank"):
        torch.testing.assert_close(s_s[key], s_d[key])


def _kl_terms(zs, zm, T=1.0):
    """Exact per-draw terms of the T=1 estimator: p [B, C], x = log p - log q [B, C]."""
    logp = torch.log_softmax(zm.double(), -1)
    logq = torch.log_softmax(zs.double() / T, -1)
    return logp.exp(), logp - logq


def test_sample_kl_and_gradient_unbiased_at_T1():
    """Mean over R independent sample caches -> dense value and gradient, within 6 sigma
    of the exact estimator variance (fixed seeds: deterministic)."""
    zs, zm, y = _data(M=1, B=8, C=10, seed=2)
    S, R = 4, 200
    p, x = _kl_terms(zs, zm[0])
    l_d, g_d, _ = _loss_grad(_dense("kd"), zs, zm, y, T=1.0, alpha_ce=0.0)
    gen = torch.Generator().manual_seed(0)
    vals, grads = [], []
    for _ in range(R):
        l_s, g_s, _ = _loss_grad(_sparse("kd"), zs, sparsify_sample(zm, y, S, gen), y, T=1.0,
                                 alpha_ce=0.0)
        vals.append(l_s)
        grads.append(g_s)
    B = zs.shape[0]
    # value: mean over B rows of (1/S) sum_draws x: variance sum_b Var_p(x_b) / (S B^2)
    var_x = (p * x * x).sum(1) - (p * x).sum(1) ** 2
    sd_value = math.sqrt(var_x.sum() / (S * B * B * R))
    assert abs(float(torch.stack(vals).mean() - l_d)) < 6 * sd_value
    # gradient entry (b, j) = (q_j - c_j/S) / B: Var = p_j (1 - p_j) / (S B^2)
    sd_grad = (p * (1 - p) / (S * B * B * R)).sqrt()
    err = (torch.stack(grads).mean(0) - g_d).abs()
    assert bool((err <= 6 * sd_grad + 1e-12).all()), float((err / sd_grad).max())


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_sample_converges_as_S_grows(T):
    """T=1: error within 6 sigma of the estimator's exact sd at each S; T=4
    (self-normalized weights, biased at finite S): the gradient error shrinks with S."""
    zs, zm, y = _data(M=1, B=16, C=10, seed=3, scale=2.0)
    l_d, g_d, _ = _loss_grad(_dense("kd"), zs, zm, y, T=T, alpha_ce=0.0)
    p, x = _kl_terms(zs, zm[0])
    errs = []
    for S in (16, 256, 20000):
        sm = sparsify_sample(zm, y, S, torch.Generator().manual_seed(S))
        l_s, g_s, _ = _loss_grad(_sparse("kd"), zs, sm, y, T=T, alpha_ce=0.0)
        errs.append(float((g_s - g_d).norm() / g_d.norm()))
        if T == 1.0:
            var_x = (p * x * x).sum(1) - (p * x).sum(1) ** 2
            assert abs(float(l_s - l_d)) < 6 * math.sqrt(var_x.sum() / (S * 16 * 16))
    # ~1/sqrt(S): 256 -> 20000 draws should shrink the error ~9x; ask for 4x
    assert errs[1] < errs[0] and errs[2] < errs[1] / 4, errs


def test_topk_rest_model_exact_at_T1_and_bounded_otherwise():
    """R(1) is stored: exact at T=1; the chord ('equal') is an upper bound for T > 1."""
    torch.manual_seed(0)
    z = torch.randn(64, 50, dtype=torch.float64) * 2
    lse, mean = torch.logsumexp(z, 1), z.mean(1)
    n = torch.full((64,), 50)
    for model in sr.REST_MODELS:
        torch.testing.assert_close(sr.rest_log_mass(lse, mean, n, 1.0, model), lse)
    for T in (2.0, 4.0, 13.0):
        true = torch.logsumexp(z / T, 1)
        assert bool((sr.rest_log_mass(lse, mean, n, 1 / T, "equal") >= true - 1e-9).all())
        moment_err = (sr.rest_log_mass(lse, mean, n, 1 / T, "moment") - true).abs().max()
        equal_err = (sr.rest_log_mass(lse, mean, n, 1 / T, "equal") - true).abs().max()
        assert moment_err < equal_err


def test_stack_mixes_topk_and_sample_mentors():
    zs, zm, y = _data(M=2, B=8, C=12, seed=4)
    mixed = stack([sparsify_topk(zm[:1], y, 11),
                   sparsify_sample(zm[1:], y, 3, torch.Generator().manual_seed(0))])
    assert mixed.modes == ("topk", "sample") and mixed.shape == (2, 8, 11)
    single = sparsify_sample(zm[1:], y, 3, torch.Generator().manual_seed(0))
    kl_mixed = sr.sparse_kl_rows(mixed, 1, zs, 2.0)
    torch.testing.assert_close(kl_mixed, sr.sparse_kl_rows(single, 0, zs, 2.0))
    torch.testing.assert_close(sr.sparse_kl_rows(mixed, 0, zs, 2.0),
                               ref.kl_rows(zm[0], zs, 2.0))


def test_modes_parse_and_refuse_bad_values():
    assert parse_mode("topk:5", 10) == ("topk", 5)
    assert parse_mode("sample:16", 10) == ("sample", 16)
    with pytest.raises(ValueError, match="K = 10 >= C = 10"):
        parse_mode("topk:10", 10)
    with pytest.raises(ValueError, match="S >= 1"):
        parse_mode("sample:0", 10)
    with pytest.raises(ValueError, match="dense, topk:K or sample:S"):
        parse_mode("top5", 10)
    # CIFAR-100: dense 200 B + 8 B stats; topk:10 = 10 * (1 + 2) + 8 + 8; sample:16 = 16 * 4 + 8
    assert bytes_per_row("dense", 100) == 208
    assert bytes_per_row("topk:10", 100) == 46
    assert bytes_per_row("sample:16", 100) == 72


def test_ckd_methods_lists_the_sparse_modes():
    from ckd.methods.listing import describe

    assert "mentor logits: dense, topk:K, sample:S" in describe(get_method("classroom"))
    assert "mentor logits: dense only" in describe(get_method("dkd"))
    assert "mentor logits" not in describe(get_method("nokd"))

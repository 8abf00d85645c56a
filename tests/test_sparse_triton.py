"""Sparse-mentor Triton kernels (Triton interpreter on CPU) against the sparse reference:
loss, gradient and stats through `distill_loss`, sweeping student dtype x C x K/S x
temperature x method, mixed topk/sample mentors, TeKAP noise, the flag, bad input."""

from __future__ import annotations

import error_bound as EB
import pytest
import torch
from device import DEVICE

from ckd.kernels import NonFiniteError, SparseMentors, check_finite
from ckd.kernels.sparse_mentors import sparsify_sample, sparsify_topk, stack
from ckd.methods import distill_loss


def _mentors(spec: str, zm, y, seed=0) -> SparseMentors:
    if spec == "mixed":  # a top-k teacher and sampled peers
        return stack([sparsify_topk(zm[:1], y, 5),
                      sparsify_sample(zm[1:], y, 8, torch.Generator().manual_seed(seed))])
    mode, n = spec.split(":")
    return sparsify_topk(zm, y, int(n)) if mode == "topk" else \
        sparsify_sample(zm, y, int(n), torch.Generator().manual_seed(seed))


def _inputs(B=12, C=40, M=3, seed=0, sdtype=torch.float32, mdtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    onehot = torch.nn.functional.one_hot(y, C)
    zs = (torch.randn(B, C, generator=g) + 2 * onehot).to(sdtype)
    quality = torch.linspace(4.0, 0.0, M).view(M, 1, 1)
    zm = (2 * torch.randn(M, B, C, generator=g) + quality * onehot).to(mdtype)
    return zs.to(DEVICE), zm.to(DEVICE), y.to(DEVICE)


def _compare(zs, sm, y, kw):
    """Fused and reference, each held to the rounding-error bound (tests/error_bound.py)
    against the sparse reference in float64 on the same inputs."""
    from test_kernels_triton import resolved

    method, params = resolved(kw)
    outs = []
    for backend in ("reference", "triton"):
        z = zs.detach().clone().requires_grad_()
        out = distill_loss(z, sm, y, backend=backend, **kw)
        out.loss.backward()
        outs.append((out, z.grad))
    z64 = zs.detach().double().requires_grad_()
    truth = distill_loss(z64, sm, y, backend="reference", **kw)
    truth.loss.backward()
    bound = EB.loss_bound(zs, sm, y, method, params, float(truth.loss.detach()))
    gbound = EB.grad_bound(zs, sm, method, params)
    if zs.dtype != torch.float32:
        gbound += float(z64.grad.abs().max()) * torch.finfo(zs.dtype).eps / 2
    for (out, g), who in zip(outs, ("reference", "fused"), strict=True):
        err = abs(float(out.loss.detach()) - float(truth.loss.detach()))
        assert err <= bound, f"{who} loss err {err:.2e} > bound {bound:.2e}"
        gerr = float((g.double() - z64.grad).abs().max())
        assert gerr <= gbound, f"{who} grad err {gerr:.2e} > bound {gbound:.2e}"
    (ro, _), (fo, _) = outs
    rtol = EB.stats_rtol(zs, None, y)
    for key in ("mentor_rank", "mentor_active", "mentor_temp", "student_rank"):
        torch.testing.assert_close(fo.stats[key], ro.stats[key], rtol=rtol,
                                   atol=rtol * (1.0 + float(params.get("tau") or 1.0)))
    assert int(fo.stats["nonfinite"]) == int(ro.stats["nonfinite"]) == 0


SLOW = pytest.mark.slow
SWEEP = [  # (student dtype, C, mode, method kwargs); the default run keeps one per feature
    (torch.float32, 40, "topk:5", dict(method="kd", T=4.0)),
    (torch.float32, 300, "sample:16", dict(method="classroom")),
    (torch.float32, 40, "mixed", dict(method="classroom", granularity="sample", delta=0.5)),
    (torch.float32, 40, "mixed", dict(method="tekap", seed=1, step=2, n_copies=2)),
    (torch.bfloat16, 40, "topk:5", dict(method="classroom")),
    pytest.param(torch.float32, 40, "topk:1", dict(method="kd", T=1.0), marks=SLOW),
    pytest.param(torch.float32, 300, "topk:20", dict(method="aver", tau=6.0), marks=SLOW),
    pytest.param(torch.float32, 40, "sample:4", dict(method="kd", T=1.0), marks=SLOW),
    pytest.param(torch.float32, 40, "topk:8", dict(method="classroom", variant="official",
                                                   granularity="sample"), marks=SLOW),
    pytest.param(torch.float32, 40, "sample:6", dict(method="dgkd", tau=5.0, seed=3, step=7),
                 marks=SLOW),
    # float64: the table's weights, 1/B, TeKAP's a and its noise in fp64 (fp32 ones put
    # ~6e-9 into the gradient against a bound of ~8e-15)
    pytest.param(torch.float64, 40, "sample:8", dict(method="tekap", T=2.0), marks=SLOW),
]


def _case_id(case) -> str:
    s, c, m, k = case.values if hasattr(case, "values") else case
    return f"{str(s).split('.')[-1]}-C{c}-{m}-{k['method']}"


@pytest.mark.parametrize("sdtype,C,spec,kw", SWEEP, ids=[_case_id(c) for c in SWEEP])
def test_sparse_kernel_matches_reference(sdtype, C, spec, kw):
    zs, zm, y = _inputs(C=C, sdtype=sdtype)
    sm = _mentors(spec, zm, y)
    if sdtype == torch.float64:
        sm.logits = sm.logits.double()
    _compare(zs, sm, y, kw)


def test_sparse_kernel_class_loop_and_fp32_mentors():
    """A class block smaller than C (the online loop over blocks) and fp32 stored logits."""
    from ckd.kernels import sparse as S
    from ckd.kernels.sparse_reference import sparse_kl_rows

    zs, zm, y = _inputs(B=6, C=70, mdtype=torch.float32)
    sm = stack([sparsify_topk(zm[:2], y, 7),
                sparsify_sample(zm[2:], y, 5, torch.Generator().manual_seed(1))])
    on = dict(device=DEVICE)
    flag = torch.zeros((), dtype=torch.int32, **on)
    w = torch.tensor([[1.0], [0.5], [2.0]], **on).expand(3, 6)
    t = torch.tensor([[3.0], [1.0], [2.5]], **on).expand(3, 6)
    src = torch.tensor([0, 1, 2], dtype=torch.int32, **on)
    copy = torch.tensor([-1, -1, -1], dtype=torch.int32, **on)
    wce = torch.zeros(6, **on)
    rows, grad = S.sparse_distill(zs, sm, y, src, copy, w, t, wce, flag, block_c=16)
    z = zs.clone().requires_grad_()
    ref = sum(wj * T * T * sparse_kl_rows(sm, m, z, T).mean()
              for m, (wj, T) in enumerate([(1.0, 3.0), (0.5, 1.0), (2.0, 2.5)]))
    (g,) = torch.autograd.grad(ref, z)
    terms = [(m, w, T, 0.0) for m, (w, T) in enumerate([(1.0, 3.0), (0.5, 1.0), (2.0, 2.5)])]
    spreads = EB.sparse_spread(sm)  # both sides' bounds: the reference is fp32 too
    bound = 2 * EB.terms_bound(zs, spreads, y, 0.0, terms, float(ref))
    assert abs(float(rows.sum()) - float(ref)) <= bound
    assert float((grad - g).abs().max()) <= 2 * EB.terms_grad_bound(zs, 0.0, terms)


def test_sparse_bad_ids_set_the_mentor_flag():
    zs, zm, y = _inputs(B=4, C=20)
    sm = sparsify_topk(zm, y, 3)
    sm.ids[1, 2, 0] = 25  # out of range
    bad_rest = sparsify_topk(zm, y, 3)
    bad_rest.rest_lse[0, 1] = float("nan")
    for mentors, method in ((sm, "aver"), (bad_rest, "kd")):
        for backend in ("reference", "triton"):
            out = distill_loss(zs, mentors, y, method=method, backend=backend)
            assert int(out.stats["nonfinite"]) == 2, (method, backend)
            with pytest.raises(NonFiniteError, match="mentor logits"):
                check_finite(out.stats)


def test_sparse_refuses_dense_only_methods_and_bad_shapes():
    zs, zm, y = _inputs(B=4, C=20)
    sm = sparsify_topk(zm, y, 3)
    with pytest.raises(ValueError, match="'dkd' runs on dense mentor logits only.*kd, aver"):
        distill_loss(zs, sm, y, method="dkd")
    with pytest.raises(ValueError, match=r"student logits are \[3, 20\]"):
        distill_loss(zs[:3], sm, y[:3], method="kd")

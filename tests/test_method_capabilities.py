"""A logit method registered from a test file, with no other edit, runs on every backend
its declaration allows: its eager reference always, the fused kernels from its term table
(`terms`), sparse mentors from its sparse reference (`sparse`). A method without a term
table runs its reference under backend 'auto' and is refused by name under 'triton'."""

from __future__ import annotations

import pytest
import torch
from device import DEVICE
from test_kernels_triton import compare, inputs
from test_sparse_triton import _compare as sparse_compare

from ckd.kernels import TermTable
from ckd.kernels import reference as R
from ckd.kernels import sparse_reference as SR
from ckd.kernels.sparse_mentors import sparsify_topk
from ckd.methods import Method, MethodError, Param, distill_loss, make_plan, register
from ckd.methods import registry as registry_mod

PARAMS = (Param("T_low", 1.0, float, "first temperature", low=0.0, low_open=True),
          Param("T_high", 4.0, float, "second temperature", low=0.0, low_open=True),
          Param("w", 0.5, float, "weight of each term", low=0.0))


def _stats(zs, zm_count, flag, T_low, w):
    one_hot = torch.zeros(zm_count, device=zs.device)
    one_hot[0] = 1.0
    return R._stats(zm_count, zs.device, one_hot * 2 * w, one_hot, one_hot * (T_low - 1) + 1,
                    1.0, flag)


def two_temps(zs, zm, y, *, T_low, T_high, w):
    """CE + w L_kd(teacher; T_low) + w L_kd(teacher; T_high): the teacher at two
    temperatures (a method no kernel was written for)."""
    loss = R.ce_rows(zs, y).mean() + w * R.l_distill(zm[0], zs, T_low) + \
        w * R.l_distill(zm[0], zs, T_high)
    return loss, _stats(zs, zm.shape[0], R._flag(zs, [zm[0]], y), T_low, w)


def two_temps_sparse(zs, sm, y, *, T_low, T_high, w):
    loss = R.ce_rows(zs, y).mean() + w * SR._l_distill(sm, 0, zs, T_low) + \
        w * SR._l_distill(sm, 0, zs, T_high)
    return loss, _stats(zs, sm.shape[0], SR._flag(zs, sm, [0], y), T_low, w)


@pytest.fixture
def registered():
    """Register the test's methods as docs/METHODS.md says; unregister them afterwards."""
    made = [
        register(Method("two-temps", "the teacher at two temperatures", mentors="teacher",
                        params=PARAMS, reference=two_temps, sparse=two_temps_sparse,
                        terms=lambda p, M: TermTable(src=(0, 0), weight=(p["w"], p["w"]),
                                                     temp=(p["T_low"], p["T_high"])))),
        register(Method("eager-only", "the teacher at two temperatures, no fused form",
                        mentors="teacher", params=PARAMS, reference=two_temps)),
    ]
    yield made
    for m in made:
        registry_mod._REGISTRY.pop(m.name)


def test_registered_method_runs_on_every_backend_it_declares(registered):
    zs, zm, y = inputs(B=8, C=30, M=2)
    kw = dict(method="two-temps", T_low=2.0, T_high=6.0, w=0.7)
    compare(zs, zm, y, kw)  # dense: the fused kernels (its table) against its reference
    sparse_compare(zs, sparsify_topk(zm, y, 5), y, kw)  # sparse: fused and reference


def test_method_without_fused_form_runs_reference_on_auto_refused_on_triton(registered):
    zs, zm, y = inputs(B=4, C=10, M=2)
    auto = distill_loss(zs, zm, y, method="eager-only", backend="auto")
    ref = distill_loss(zs, zm, y, method="eager-only", backend="reference")
    assert torch.equal(auto.loss, ref.loss)
    with pytest.raises(MethodError, match="'eager-only' has no fused kernel form"):
        distill_loss(zs, zm, y, method="eager-only", backend="triton")
    with pytest.raises(MethodError, match="'eager-only' has no fused kernel form"):
        make_plan("eager-only", backend="triton")
    assert make_plan("eager-only", backend="auto").loss(zs, zm, y).loss == ref.loss
    with pytest.raises(ValueError, match="'eager-only' runs on dense mentor logits only"):
        distill_loss(zs, sparsify_topk(zm, y, 3), y, method="eager-only")


def test_tables_reject_what_they_cannot_read():
    with pytest.raises(ValueError, match="one entry per term"):
        TermTable(src=(0, 1), weight=(1.0,), temp=(1.0, 2.0))
    zs, zm, y = inputs(B=4, C=10, M=1)
    from ckd.kernels import terms_loss

    with pytest.raises(ValueError, match=r"reads mentors \(0, 1\) but the batch has M = 1"):
        terms_loss(zs.to(DEVICE), zm, y, TermTable(src=(0, 1), weight=(1.0, 1.0),
                                                   temp=(1.0, 1.0)))

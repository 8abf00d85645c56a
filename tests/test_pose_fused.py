"""The pose losses on the fused kernels (TRITON_INTERPRET=1 on CPU, small batches) against
the eager reference (the contract) and against the Eq. 15 transcription: SimCC rows (two
segments) and heatmap rows, kd / aver / classroom (external PCK keys per sample, NaN where
a sample has no joint), losses, gradients and the selection's statistics."""

import pytest
import torch
import torch.nn.functional as F
from test_pose_loss import SIMCC, _data, _eq15, _task

from ckd.pose.fused import fused_pose_loss
from ckd.pose.loss import pose_loss

KEYS_S = torch.tensor([0.5, 0.6, float("nan"), 0.7, 0.4, 0.6])
KEYS_M = torch.tensor([[0.9, 0.8, float("nan"), 0.9, 0.9, 0.8],
                       [0.3, 0.2, float("nan"), 0.4, 0.3, 0.3],
                       [0.7, 0.6, float("nan"), 0.6, 0.7, 0.5]])


def _both(method, zs, zm, target, weight, segs, **kw):
    out = []
    for fn in (pose_loss, fused_pose_loss):
        z = zs.clone().requires_grad_(True)
        loss, stats = fn(method, z, zm, target, weight, segs, **kw)
        loss.backward()
        out.append((loss.detach(), z.grad, stats))
    return out


@pytest.mark.parametrize("method", ["kd", "aver", "classroom"])
def test_fused_equals_reference_simcc(method):
    zs, zm, target, weight = (t.float() for t in _data(seed=2))
    kw = {"student_key": KEYS_S, "mentor_keys": KEYS_M} if method == "classroom" else {}
    (l_ref, g_ref, s_ref), (l_fused, g_fused, s_fused) = _both(method, zs, zm, target, weight,
                                                               SIMCC, **kw)
    assert torch.allclose(l_fused, l_ref, rtol=1e-5, atol=1e-6), (l_fused, l_ref)
    assert torch.allclose(g_fused, g_ref, rtol=1e-4, atol=1e-7)
    for name in ("mentor_rank", "mentor_active", "mentor_temp"):
        assert torch.allclose(s_fused[name], s_ref[name], rtol=1e-5, atol=1e-6), name
    assert float(s_fused["student_rank"]) == pytest.approx(float(s_ref["student_rank"]),
                                                           rel=1e-5)
    if method == "classroom":
        assert s_fused["mentor_active"].tolist() == [1.0, 0.0, 1.0]


def test_fused_classroom_matches_eq15_transcription():
    """Appendix B by hand: r = lam P / sum P over batch-mean PCKs, mentors above the student
    at 1 + tau (r_m - r_s) / r_m, weights beta r_m, the student's task weighted r_s."""
    zs, zm, target, weight = (t.float() for t in _data())
    tau, beta = 4.0, 2.5
    P = [float(torch.nanmean(KEYS_S))] + [float(torch.nanmean(k)) for k in KEYS_M]
    r = [3 * p / sum(P) for p in P]
    expect = r[0] * _task(zs.double(), target.double(), weight.double())
    for mi in range(3):
        if r[mi + 1] > r[0]:
            t = 1 + tau * (r[mi + 1] - r[0]) / r[mi + 1]
            expect = expect + beta * r[mi + 1] * _eq15(zm[mi].double(), zs.double(), t)
    loss, stats = fused_pose_loss("classroom", zs.clone().requires_grad_(True), zm, target,
                                  weight, SIMCC, student_key=KEYS_S, mentor_keys=KEYS_M)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert float(stats["student_rank"]) == pytest.approx(r[0], rel=1e-6)


def test_fused_heatmap_rows_and_delta_term():
    g = torch.Generator().manual_seed(4)
    n, k, d = 4, 3, 6 * 5
    zs = torch.randn(n, k, d, generator=g)
    zm = torch.randn(2, n, k, d, generator=g) * 2
    target = F.softmax(torch.randn(n, k, d, generator=g), -1)
    weight = torch.ones(n, k)
    keys_s, keys_m = torch.tensor([0.2, 0.4, 0.3, 0.1]), torch.tensor([[0.9, 0.8, 0.7, 0.9],
                                                                       [0.5, 0.6, 0.4, 0.5]])
    for method, kw in (("aver", {}), ("classroom", {"delta": 0.5}), ("kd", {"T": 2.0})):
        keys = {"student_key": keys_s, "mentor_keys": keys_m} if method == "classroom" else {}
        (l_ref, g_ref, _), (l_fused, g_fused, _) = _both(method, zs, zm, target, weight,
                                                         [(0, d)], **keys, **kw)
        assert torch.allclose(l_fused, l_ref, rtol=1e-5, atol=1e-6), method
        assert torch.allclose(g_fused, g_ref, rtol=1e-4, atol=1e-7), method


def test_fused_refuses_what_it_does_not_run():
    zs, zm, target, weight = (t.float() for t in _data())
    with pytest.raises(ValueError, match="batch granularity"):
        fused_pose_loss("classroom", zs, zm, target, weight, SIMCC, student_key=KEYS_S,
                        mentor_keys=KEYS_M, granularity="sample")
    with pytest.raises(ValueError, match="ranking keys"):
        fused_pose_loss("classroom", zs, zm, target, weight, SIMCC)

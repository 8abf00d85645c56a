"""The pose losses against a literal transcription of the ClassroomKD appendix (Eq. 15,
PCK ranking) and of the baselines."""

import pytest
import torch
import torch.nn.functional as F

from ckd.pose.loss import pose_loss

N, K, DX, DY = 6, 5, 12, 16
SIMCC = [(0, DX), (DX, DX + DY)]


def _kl_distill(zm, zs, T):
    """L_distill of Eq. 7 on rows reshaped to (N*K, -1): T^2 KL, summed over the joint
    rows and averaged over the N samples."""
    n = zm.shape[0]
    zm, zs = zm.reshape(-1, zm.shape[-1]), zs.reshape(-1, zs.shape[-1])
    return T * T * F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zm / T, 1),
                            reduction="sum") / n


def _eq15(zm, zs, T):
    """L_simcc = (1/K) (L_distill(x) + L_distill(y))."""
    k = zs.shape[1]
    return (_kl_distill(zm[..., :DX], zs[..., :DX], T)
            + _kl_distill(zm[..., DX:], zs[..., DX:], T)) / k


def _task(zs, target, weight):
    ce = 0
    for a, b in SIMCC:
        ce = ce - (target[..., a:b] * F.log_softmax(zs[..., a:b], -1)).sum(-1)
    return (weight * ce).sum() / (zs.shape[0] * zs.shape[1])


def _data(seed=0, m=3):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(N, K, DX + DY, generator=g, dtype=torch.float64) * 2
    zm = torch.randn(m, N, K, DX + DY, generator=g, dtype=torch.float64) * 3
    target = torch.cat([F.softmax(torch.randn(N, K, DX, generator=g), -1),
                        F.softmax(torch.randn(N, K, DY, generator=g), -1)], -1).double()
    weight = (torch.rand(N, K, generator=g) > 0.2).double()
    return zs, zm, target, weight


def test_classroom_matches_appendix_b_transcription():
    zs, zm, target, weight = _data()
    student_key = torch.tensor([0.5, 0.6, float("nan"), 0.7, 0.4, 0.6], dtype=torch.float64)
    mentor_keys = torch.tensor([[0.9, 0.8, float("nan"), 0.9, 0.9, 0.8],  # teacher: strong
                                [0.3, 0.2, float("nan"), 0.4, 0.3, 0.3],  # weak: masked
                                [0.7, 0.6, float("nan"), 0.6, 0.7, 0.5]], dtype=torch.float64)
    tau, beta = 4.0, 2.5
    # Appendix B: sharpness P = PCK (here over the batch's samples with joints),
    # normalized in the classroom: r = lam P / sum P, lam = number of mentors
    P = [float(torch.nanmean(student_key))] + [float(torch.nanmean(k)) for k in mentor_keys]
    r = [3 * p / sum(P) for p in P]
    expect = r[0] * _task(zs, target, weight)
    for mi in range(3):
        if r[mi + 1] > r[0]:
            t = 1 + tau * (r[mi + 1] - r[0]) / r[mi + 1]
            expect = expect + beta * r[mi + 1] * _eq15(zm[mi], zs, t)
    zs1 = zs.clone().requires_grad_(True)
    loss, stats = pose_loss("classroom", zs1, zm, target, weight, SIMCC,
                            student_key=student_key, mentor_keys=mentor_keys)
    assert stats["mentor_active"].tolist() == [1.0, 0.0, 1.0]
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    zs2 = zs.clone().requires_grad_(True)
    # the same with the selection fixed by hand, for the gradient
    ref = r[0] * _task(zs2, target, weight)
    for mi in (0, 2):
        t = 1 + tau * (r[mi + 1] - r[0]) / r[mi + 1]
        ref = ref + beta * r[mi + 1] * _eq15(zm[mi], zs2, t)
    loss.backward()
    ref.backward()
    assert torch.allclose(zs1.grad.double(), zs2.grad, rtol=1e-4, atol=1e-7)


def test_heatmap_rows_kl_divided_by_joints():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(N, K, 6 * 4, generator=g)
    zm = torch.randn(1, N, K, 6 * 4, generator=g)
    target = F.softmax(torch.randn(N, K, 24, generator=g), -1)
    weight = torch.ones(N, K)
    loss, _ = pose_loss("kd", zs, zm, target, weight, [(0, 24)], T=2.0, alpha_ce=0.0)
    assert loss.item() == pytest.approx(_kl_distill(zm[0], zs, 2.0).item() / K, rel=1e-5)


def test_baselines():
    zs, zm, target, weight = _data(2)
    nokd, _ = pose_loss("nokd", zs, None, target, weight, SIMCC)
    assert nokd.item() == pytest.approx(_task(zs, target, weight).item(), rel=1e-6)
    kd, st = pose_loss("kd", zs, zm, target, weight, SIMCC, T=4.0, alpha_ce=0.5, alpha_kd=2.0)
    assert kd.item() == pytest.approx(
        (0.5 * _task(zs, target, weight) + 2.0 * _eq15(zm[0], zs, 4.0)).item(), rel=1e-5)
    assert st["mentor_active"].tolist() == [1.0, 0.0, 0.0]
    aver, _ = pose_loss("aver", zs, zm, target, weight, SIMCC)
    assert aver.item() == pytest.approx(
        (_task(zs, target, weight) + sum(_eq15(zm[i], zs, 4.0) for i in range(3))).item(),
        rel=1e-5)
    with pytest.raises(ValueError, match="ranking keys"):
        pose_loss("classroom", zs, zm, target, weight, SIMCC)
    with pytest.raises(ValueError, match="takes"):
        pose_loss("aver", zs, zm, target, weight, SIMCC, T=3.0)


def test_classroom_sample_granularity_and_no_joints():
    zs, zm, target, weight = _data(3, m=2)
    sk = torch.full((N,), 0.5, dtype=torch.float64)
    mk = torch.stack([torch.full((N,), 0.8), torch.full((N,), 0.2)]).double()
    mk[0, 0] = 0.1  # on sample 0 the teacher is worse than the student
    loss, st = pose_loss("classroom", zs, zm, target, weight, SIMCC, student_key=sk,
                         mentor_keys=mk, granularity="sample")
    assert st["mentor_active"].tolist() == pytest.approx([5 / 6, 0.0])
    r_s = 2 * 0.5 / 1.5
    r_t = 2 * 0.8 / 1.5
    t = 1 + 4.0 * (r_t - r_s) / r_t
    # samples 1..5: teacher active; sample 0: only the task term (weight r_s0 = 2*.5/.8)
    per_task = [_task(zs[i:i + 1], target[i:i + 1], weight[i:i + 1]) for i in range(N)]
    expect = (2 * 0.5 / 0.8) * per_task[0] + sum(
        r_s * per_task[i] + 2.5 * r_t * _eq15(zm[0, i:i + 1], zs[i:i + 1], t)
        for i in range(1, N))
    assert loss.item() == pytest.approx(expect.item() / N, rel=1e-5)

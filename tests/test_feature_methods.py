"""Feature-level methods' eager references: CRD (against a loop transcription of
RepDistiller's ContrastMemory/ContrastLoss), TeKAP's feature level, SDKD's proxy + FFB."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ckd.methods.crd import (
    CRDModule,
    crd_loss,
    draw_negatives,
    tekap_feature_copies,
    tekap_feature_loss,
)
from ckd.methods.sdkd import FeatureFusionBlock, sdkd_loss


def _labels(n: int = 60, classes: int = 5) -> torch.Tensor:
    return torch.arange(n) % classes


def _module(n=60, classes=5, s_dim=8, t_dim=12, **kw) -> CRDModule:
    torch.manual_seed(0)
    return CRDModule(s_dim, t_dim, _labels(n, classes), feat_dim=6, nce_k=7, **kw)


def _repdistiller_pass(mem_s, mem_t, z, v_s, v_t, y, cidx, T, m, n_data):
    """One ContrastMemory.forward + two ContrastLoss, written as plain loops the way
    RepDistiller's memory.py/criterion.py compute them (memory_v1 = student side)."""
    B, K1 = cidx.shape
    out_v2 = torch.stack([torch.stack([torch.exp(mem_s[cidx[b, j]] @ v_t[b] / T)
                                       for j in range(K1)]) for b in range(B)])
    out_v1 = torch.stack([torch.stack([torch.exp(mem_t[cidx[b, j]] @ v_s[b] / T)
                                       for j in range(K1)]) for b in range(B)])
    if z[0] < 0:
        z[0] = float(out_v1.mean() * n_data)
    if z[1] < 0:
        z[1] = float(out_v2.mean() * n_data)
    out_v1, out_v2 = out_v1 / z[0], out_v2 / z[1]

    def contrast_loss(x):
        mm = x.shape[1] - 1
        pn = 1 / float(n_data)
        d1 = torch.log(x[:, 0] / (x[:, 0] + mm * pn + 1e-7))
        d0 = torch.log((mm * pn) / (x[:, 1:] + mm * pn + 1e-7))
        return -(d1.sum(0) + d0.reshape(-1).sum(0)) / x.shape[0]

    with torch.no_grad():
        for mem, v in ((mem_s, v_s), (mem_t, v_t)):
            for b in range(B):
                row = mem[y[b]] * m + v[b] * (1 - m)
                mem[y[b]] = row / row.norm()
    return contrast_loss(out_v1), contrast_loss(out_v2)


def test_crd_matches_repdistiller_transcription() -> None:
    mod = _module()
    mem_s, mem_t = mod.memory_s.clone(), mod.memory_t.clone()
    z = [-1.0, -1.0]
    labels_all = _labels()
    for step in range(3):  # three steps: Z is set once, the memories move
        idx = torch.arange(step * 8, step * 8 + 8)
        f_s, f_t = torch.randn(8, 8, requires_grad=True), torch.randn(8, 12)
        cidx = mod.negatives(labels_all[idx], idx, seed=3, step=step)
        v_s = mod.embed_s(f_s).detach()
        v_t = mod.embed_t(f_t).detach()
        want_s, want_t = _repdistiller_pass(mem_s, mem_t, z, v_s, v_t, idx, cidx,
                                            0.07, 0.5, 60)
        loss, stats = crd_loss(mod, f_s, f_t, labels_all[idx], idx, seed=3, step=step)
        torch.testing.assert_close(stats["crd_s"], want_s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats["crd_t"], want_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mod.memory_s, mem_s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mod.memory_t, mem_t, rtol=1e-6, atol=1e-6)
        # exp(<m, v> / 0.07) turns fp32 rounding of the dot product into ~1e-6 relative
        torch.testing.assert_close(mod.z, torch.tensor(z), rtol=1e-5, atol=0)
        loss.backward()
        assert f_s.grad is not None and f_s.grad.abs().sum() > 0
        assert mod.embed_s.linear.weight.grad.abs().sum() > 0
        assert mod.embed_t.linear.weight.grad.abs().sum() > 0
        mod.zero_grad()


def test_negatives_come_from_other_classes_and_are_keyed() -> None:
    labels_all = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 1, 0, 3, 3])
    mod = CRDModule(4, 4, labels_all, feat_dim=4, nce_k=500)
    idx = torch.arange(12)
    neg = mod.negatives(labels_all, idx, seed=1, step=5)
    assert neg.shape == (12, 501) and torch.equal(neg[:, 0], idx)
    assert (labels_all[neg[:, 1:]] != labels_all.view(-1, 1)).all()
    # every other-class sample is drawn (500 draws over <= 10 candidates)
    for b in range(12):
        others = set(torch.nonzero(labels_all != labels_all[b]).flatten().tolist())
        assert set(neg[b, 1:].tolist()) == others
    again = draw_negatives(1, 5, labels_all, 500, mod.by_class, mod.class_start,
                           mod.class_count)
    assert torch.equal(again, neg[:, 1:])  # same keys, same draw (resume)
    assert not torch.equal(mod.negatives(labels_all, idx, seed=1, step=6), neg)
    assert not torch.equal(mod.negatives(labels_all, idx, seed=2, step=5), neg)


def test_negatives_are_drawn_without_replacement_when_they_fit() -> None:
    """RepDistiller's sampler: `np.random.choice(cls_negative[y], k, replace=k > pool)`.
    k close to the pool size: no repeat in any row, keyed (same keys, same draw), and
    every candidate equally likely over many steps."""
    labels_all = torch.arange(200) % 4  # a pool of 150 other-class samples per row
    mod = CRDModule(4, 4, labels_all, feat_dim=4, nce_k=149)
    idx = torch.arange(0, 200, 5)
    counts, first = torch.zeros(200), None
    steps = 200
    for step in range(steps):
        neg = mod.negatives(labels_all[idx], idx, seed=7, step=step)[:, 1:]
        assert (labels_all[neg] != labels_all[idx].view(-1, 1)).all()
        assert all(len(set(row.tolist())) == 149 for row in neg)
        counts += torch.bincount(neg[labels_all[idx] == 0].flatten(), minlength=200)
        if step == 0:
            first = neg
    again = draw_negatives(7, 0, labels_all[idx], 149, mod.by_class, mod.class_start,
                           mod.class_count)
    assert torch.equal(again, first)
    # class-0 rows: each of the 150 candidates drawn with probability 149/150 per row
    rows = int((labels_all[idx] == 0).sum()) * steps
    seen = counts[labels_all != 0]
    assert counts[labels_all == 0].sum() == 0
    assert float(seen.min()) > rows * 149 / 150 - 4 * (rows * 149 / 150 ** 2) ** 0.5 - 1
    # the first negative of each row is uniform over its pool: with 10 rows per class,
    # every sample is the first negative of 30 rows' pools (chi-square, 199 dof)
    firsts = torch.cat([mod.negatives(labels_all[idx], idx, seed=1, step=s)[:, 1]
                        for s in range(300)])
    first_counts = torch.bincount(firsts, minlength=200).double()
    expected = len(firsts) / 200
    chi2 = float(((first_counts - expected) ** 2 / expected).sum())
    assert chi2 < 199 + 5 * (2 * 199) ** 0.5  # ~ mean + 5 sd


@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17, 64, 65, 1000])
def test_keyed_permutation_is_a_bijection_of_the_range(m) -> None:
    from ckd.hashing import permute_below

    keys = torch.tensor([[0], [1], [0xFFFFFFFF], [123456789]])
    y = permute_below(keys, torch.arange(m).view(1, -1), torch.tensor([[m]]))
    assert all(sorted(row.tolist()) == list(range(m)) for row in y)
    assert m < 5 or len({tuple(row.tolist()) for row in y}) == 4  # keys change the order


def test_more_negatives_than_the_pool_are_drawn_with_replacement() -> None:
    labels_all = torch.tensor([0] * 30 + [1] * 3)  # class-1 rows: a pool of 30, k = 20 fits
    mod = CRDModule(4, 4, labels_all, feat_dim=4, nce_k=20)
    neg = mod.negatives(labels_all, torch.arange(33), seed=0, step=0)[:, 1:]
    assert all(len(set(row.tolist())) == 20 for row in neg[30:])
    assert (labels_all[neg[:30]] == 1).all()  # class-0 rows: 20 draws from 3 candidates


def test_crd_memory_size_and_state_round_trip() -> None:
    mod = _module(n=60)
    assert mod.memory_bytes() == 2 * 60 * 6 * 4
    idx = torch.arange(8)
    crd_loss(mod, torch.randn(8, 8), torch.randn(8, 12), _labels()[idx], idx, seed=0, step=0)
    other = _module(n=60)
    other.load_state_dict(mod.state_dict())
    for a, b in zip(mod.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the restored module continues exactly (Z is read back, not recomputed)
    f_s, f_t = torch.randn(8, 8), torch.randn(8, 12)
    la, _ = crd_loss(mod, f_s, f_t, _labels()[idx], idx, seed=0, step=1)
    lb, _ = crd_loss(other, f_s, f_t, _labels()[idx], idx, seed=0, step=1)
    assert torch.equal(la, lb) and torch.equal(mod.memory_s, other.memory_s)


def test_crd_refuses_a_single_class() -> None:
    with pytest.raises(ValueError, match="two classes"):
        CRDModule(4, 4, torch.zeros(10, dtype=torch.long))


def test_tekap_feature_copies_follow_the_authors_mix() -> None:
    f_t = torch.randn(64, 256)
    copies = tekap_feature_copies(f_t, seed=0, step=0, n_copies=3, a=0.1, noise_std=0.1)
    assert copies.shape == (3, 64, 256)
    noise = (copies - 0.9 * f_t) / (0.1 * 0.1)
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02
    assert not torch.allclose(copies[0], copies[1])
    again = tekap_feature_copies(f_t, seed=0, step=0, n_copies=3, a=0.1, noise_std=0.1)
    assert torch.equal(copies, again)
    assert not torch.equal(
        copies, tekap_feature_copies(f_t, seed=0, step=1, n_copies=3, a=0.1, noise_std=0.1))


def test_tekap_feature_is_crd_plus_noisy_passes() -> None:
    labels_all = _labels()
    idx = torch.arange(8)
    f_s, f_t = torch.randn(8, 8), torch.randn(8, 12)
    # no copies: exactly CRD
    a, b = _module(), _module()
    la, _ = crd_loss(a, f_s, f_t, labels_all[idx], idx, seed=0, step=0)
    lb, _ = tekap_feature_loss(b, f_s, f_t, labels_all[idx], idx, seed=0, step=0, n_copies=0)
    assert torch.equal(la, lb) and torch.equal(a.memory_t, b.memory_t)
    # one copy (the authors' default): loss + loss_1 with a second contrast pass
    a, b = _module(), _module()
    loss, stats = tekap_feature_loss(a, f_s, f_t, labels_all[idx], idx, seed=0, step=0)
    cidx = b.negatives(labels_all[idx], idx, 0, 0)
    v_s = b.embed_s(f_s)
    s1, t1 = b.contrast(v_s, b.embed_t(f_t), idx, cidx)
    noisy = tekap_feature_copies(f_t, seed=0, step=0, n_copies=1, a=0.1, noise_std=0.1)[0]
    _, t2 = b.contrast(v_s, b.embed_t(noisy), idx, cidx)
    torch.testing.assert_close(loss, (s1 + t1) + (s1 + t2))
    torch.testing.assert_close(stats["tekap_t_noisy"], t2)
    assert torch.equal(a.memory_t, b.memory_t)  # both passes updated the memories


def test_sdkd_proxy_starts_as_the_student_and_gradients_split() -> None:
    torch.manual_seed(0)
    classifier = torch.nn.Linear(8, 5)
    ffb = FeatureFusionBlock(8, 12)
    f_s = torch.randn(16, 8, requires_grad=True)
    logits = classifier(f_s)
    labels = torch.randint(0, 5, (16,))
    loss, stats = sdkd_loss(ffb, f_s, torch.randn(16, 12), logits, classifier, labels)
    # zero-initialised FFB: proxy == student, so the KL is 0 and the FFB CE is the student's
    assert float(stats["sdkd_kl"]) < 1e-6
    torch.testing.assert_close(stats["sdkd_proxy_ce"], F.cross_entropy(logits, labels))
    loss.backward()
    assert ffb.fuse.weight.grad.abs().sum() > 0  # the FFB learns from its CE
    # the student gets no gradient through the proxy (KL is ~0, its target detached)
    assert f_s.grad.abs().max() < 1e-6 and classifier.weight.grad.abs().max() < 1e-6


def test_sdkd_ffb_learns_to_use_the_teacher_and_the_student_follows() -> None:
    torch.manual_seed(0)
    classifier = torch.nn.Linear(8, 4)
    ffb = FeatureFusionBlock(8, 4)
    opt = torch.optim.SGD(ffb.parameters(), lr=0.5)
    labels = torch.arange(64) % 4
    f_t = F.one_hot(labels, 4).float() * 3  # a teacher feature that names the label
    f_s = torch.randn(64, 8)  # a student feature that knows nothing
    for _ in range(100):
        loss, stats = sdkd_loss(ffb, f_s, f_t, classifier(f_s), classifier, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(stats["sdkd_proxy_acc"]) == 1.0
    assert float(stats["sdkd_kl"]) > 0.1  # now the proxy has something to teach
    # the KL pulls the student's logits toward the proxy's: its gradient is non-zero
    z = classifier(f_s).detach().requires_grad_(True)
    loss, _ = sdkd_loss(ffb, f_s, f_t, z, classifier, labels, alpha_ffb=0.0)
    loss.backward()
    assert z.grad.abs().sum() > 0 and math.isfinite(float(loss.detach()))

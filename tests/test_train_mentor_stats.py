"""The trainer hands the cache's stored mentor statistics to the fused loss (so its ranking
reads no mentor row for them), online mentors compute the same statistics with the same
function, and a run that passes them ends at the weights of a run that lets the loss
compute them (bit for bit)."""

from __future__ import annotations

import pytest
import torch

import ckd.methods.loss
from ckd.mentor_stats import mentor_row_stats
from ckd.train import train

TINY = dict(n_train=16, n_test=8, num_classes=10, seed=0)
CFG = dict(dataset="synthetic", dataset_options=TINY, student="resnet8", method="classroom",
           epochs=1, batch_size=8, progress=False, device="cpu", backend="triton",
           log_every=1, seed=2)


@pytest.fixture(scope="module")
def mentors(tmp_path_factory):
    from ckd.cache import build_cache
    from ckd.data import load_dataset
    from ckd.models import create_model, save_checkpoint

    tmp = tmp_path_factory.mktemp("stats")
    paths = {}
    for alias, seed in (("t", 3), ("p", 4)):
        torch.manual_seed(seed)
        paths[alias] = str(tmp / f"{alias}.pt")
        save_checkpoint(paths[alias], create_model("resnet8", 10), arch="resnet8",
                        num_classes=10, dataset="synthetic", metrics={})
    cache = build_cache(load_dataset("synthetic", **TINY), paths, tmp / "cache", views=2,
                        dtype="fp32", progress=False)
    return {"cache": str(cache), "paths": paths, "tmp": tmp}


def _recording(monkeypatch) -> list[tuple]:
    """Wrap distill_loss (LossPlan.loss imports it per call): record what it is handed."""
    seen: list[tuple] = []
    real = ckd.methods.loss.distill_loss

    def spy(zs, zm, y, **kw):
        stats = kw.get("mentor_stats")
        seen.append((zm.detach().clone(), y.clone(),
                     None if stats is None else stats.clone()))
        return real(zs, zm, y, **kw)

    monkeypatch.setattr(ckd.methods.loss, "distill_loss", spy)
    return seen


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("online", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["cached", "online"])
def test_trainer_hands_mentor_stats_to_the_loss(mentors, tmp_path, monkeypatch, online):
    src = dict(mentors_online=True, mentors=[f"{a}={p}" for a, p in mentors["paths"].items()]) \
        if online else dict(cache=mentors["cache"], mentors=["t", "p"])
    seen = _recording(monkeypatch)
    with_stats = train(dict(CFG, **src, out=str(tmp_path / "with")))
    assert len(seen) == 2  # 16 samples, batch 8
    for zm, y, stats in seen:
        assert stats is not None and stats.dtype == torch.float32
        assert stats.shape == (2, 8, 2)
        # the stored (or online) statistics are those of the logits the loss reads
        assert torch.equal(stats, mentor_row_stats(zm, y))
    # the same run with the loss computing the statistics itself: the same weights
    import ckd.train.epoch

    monkeypatch.setattr(ckd.train.epoch, "wants_mentor_stats", lambda run: False)
    seen.clear()
    without = train(dict(CFG, **src, out=str(tmp_path / "without")))
    assert all(stats is None for _, _, stats in seen) and len(seen) == 2
    _same_weights(with_stats["model"], without["model"])


def test_no_stats_for_methods_that_do_not_rank(mentors, tmp_path, monkeypatch):
    seen = _recording(monkeypatch)
    train(dict(CFG, method="kd", cache=mentors["cache"], mentors=["t"], out=str(tmp_path / "kd")))
    assert seen and all(stats is None for _, _, stats in seen)

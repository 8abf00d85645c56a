"""Sparse logit storage: `build_cache(logits=...)` with mixed modes per mentor, the reader's
SparseMentors equal to sparsifying the dense cache's rows, stream mode == memory mode
(reader rows and whole training runs), info/verify (a corrupted id or count fails verify),
bad modes refused, and the loss runs on what the reader returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from ckd.cache import build_cache, open_cache
from ckd.cache.info import info, verify
from ckd.cache.sparse import logits_modes
from ckd.data import load_dataset
from ckd.kernels.sparse_mentors import sparsify_topk
from ckd.methods import distill_loss
from ckd.models import create_model, save_checkpoint

N_TRAIN, C = 40, 12


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse-cache")
    ds = load_dataset("synthetic", n_train=N_TRAIN, n_test=8, num_classes=C)
    paths = {}
    for seed, alias in enumerate(("r8", "r8b", "r8c")):
        torch.manual_seed(seed)
        model = create_model("resnet8", num_classes=C).eval()
        save_checkpoint(tmp / f"{alias}.pt", model, arch="resnet8", num_classes=C,
                        dataset=ds.name, metrics={})
        paths[alias] = tmp / f"{alias}.pt"
    kw = dict(views=2, seed=3, dtype="fp16", batch_size=40, samples_per_chunk=16,
              progress=False)
    dense = build_cache(ds, paths, tmp / "dense", **kw)
    mixed = build_cache(ds, paths, tmp / "mixed",
                        logits="r8=dense,r8b=topk:4,r8c=sample:6", **kw)
    two = {a: paths[a] for a in ("r8", "r8b")}
    topk = build_cache(ds, two, tmp / "topk", logits="topk:3", **kw)
    sample = build_cache(ds, two, tmp / "sample", logits="sample:5", **kw)
    return dict(tmp=tmp, ds=ds, dense=dense, mixed=mixed, topk=topk, sample=sample,
                paths=paths, kw=kw)


def test_sparse_rows_equal_sparsified_dense_rows(caches):
    dense = open_cache(caches["dense"])
    mixed = open_cache(caches["mixed"])
    assert mixed.logits_modes == {"r8": "dense", "r8b": "topk:4", "r8c": "sample:6"}
    idx = torch.arange(N_TRAIN)
    slots = torch.tensor([0, 1]).repeat(N_TRAIN // 2)
    zd, st = dense.gather(slots, idx, with_stats=True)
    sm = mixed.gather(slots, idx)
    assert sm.modes == ("topk", "topk", "sample") and sm.shape == (3, N_TRAIN, C)
    y = dense.labels[idx]
    expect = sparsify_topk(zd[1:2], y, 4)
    # the K largest values at their ids (ties in fp16 may pick another of equal classes)
    torch.testing.assert_close(sm.logits[1, :, :4].sort(-1).values,
                               expect.logits[0].sort(-1).values)
    torch.testing.assert_close(sm.logits[1, :, :4], zd[1].gather(1, sm.ids[1, :, :4].long()))
    assert bool((sm.counts[1, :, 4:] == 0).all())  # padded to the set's widest row
    torch.testing.assert_close(sm.rest_lse[1], expect.rest_lse[0])
    torch.testing.assert_close(sm.true_logp, st[..., 0])  # exact: ranks equal dense
    torch.testing.assert_close(sm.lse, st[..., 1])
    assert bool((sm.counts[2].sum(-1) == 6).all())
    drawn = sm.ids[2][sm.counts[2] > 0].long()
    z_at = zd[2].float().gather(1, sm.ids[2].long())
    assert bool((drawn < C).all())
    torch.testing.assert_close(sm.logits[2].float()[sm.counts[2] > 0],
                               z_at[sm.counts[2] > 0])
    # the dense mentor inside a mixed set is exact: every class, no rest
    torch.testing.assert_close(sm.densify()[0], zd[0].float())
    zs = torch.randn(N_TRAIN, C, generator=torch.Generator().manual_seed(0))
    out = distill_loss(zs, sm, y, method="classroom", granularity="sample")
    ref = distill_loss(zs, zd, y, method="classroom", granularity="sample")
    assert torch.isfinite(out.loss)
    for key in ("mentor_rank", "mentor_active", "mentor_temp", "student_rank"):
        torch.testing.assert_close(out.stats[key], ref.stats[key])


def test_sparse_info_and_verify(caches, tmp_path):
    _, rows = info(caches["mixed"])
    by = {r["alias"]: r for r in rows}
    assert by["r8"]["logits_mode"] == "dense" and by["r8"]["ratio_to_dense"] == 1.0
    # C=12, fp16: topk:4 = 4 * (1 + 2) + 8 + 8 B; sample:6 = 6 * (1 + 1 + 2) + 8 B
    assert by["r8b"]["bytes_per_view"] == 28 and by["r8c"]["bytes_per_view"] == 32
    assert verify(caches["mixed"]).ok
    # corrupt one id and one count (rewritten through zarr, so checksums match the new
    # bytes: only the semantic checks can catch it)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(caches["mixed"], bad)
    root = zarr.open_group(str(bad), mode="r+")
    ids = root["mentors/r8b/topk_ids"]
    ids[0, 0, 0] = np.uint8(200)
    counts = root["mentors/r8c/sample_counts"]
    counts[1, 3, 0] = counts[1, 3, 0] + 1
    sample_ids = root["mentors/r8c/sample_ids"]
    sample_ids[0, 5, 0] = np.uint8(12)  # slot 0 of a row is always drawn (count > 0)
    rep = verify(bad)
    text = "\n".join(rep.problems)
    assert not rep.ok
    assert "r8b" in text and "1 class ids outside [0, 12)" in text
    assert "r8c" in text and "1 rows whose draw counts do not sum to S = 6" in text
    assert sum("class ids outside" in p for p in rep.problems) == 2, text  # topk and sample


def test_sparse_modes_refused_with_the_fix(caches):
    aliases = ["r8", "r8b"]
    assert logits_modes("topk:3", aliases, C) == {"r8": "topk:3", "r8b": "topk:3"}
    assert logits_modes("r8b=sample:4", aliases, C) == {"r8": "dense", "r8b": "sample:4"}
    with pytest.raises(ValueError, match="K = 12 >= C = 12"):
        logits_modes("topk:12", aliases, C)
    with pytest.raises(ValueError, match="S >= 1"):
        logits_modes("sample:0", aliases, C)
    with pytest.raises(ValueError, match="not in --mentors"):
        logits_modes("r110=topk:3", aliases, C)


def test_trainer_trains_from_a_sparse_cache(caches, tmp_path):
    from ckd.train import train

    base = dict(dataset="synthetic", dataset_options=dict(n_train=N_TRAIN, n_test=8,
                                                          num_classes=C),
                student="resnet8", epochs=1, batch_size=20, progress=False, device="cpu",
                backend="reference", log_every=1, cache=str(caches["mixed"]))
    res = train(dict(base, method="classroom", out=str(tmp_path / "cls")))
    assert sorted(res["mentors"]) == ["r8", "r8b", "r8c"] and np.isfinite(res["last_acc"])
    # refused while the run is set up (nothing written), naming the modes dkd runs on and
    # the methods that run on sparse mentors
    with pytest.raises(ValueError, match="'dkd' runs on dense mentor logits only.*work with "
                                         "nokd, kd, aver"):
        train(dict(base, method="dkd", out=str(tmp_path / "dkd")))
    assert not (tmp_path / "dkd").exists()


def _same_sparse(a, b) -> None:
    assert a.modes == b.modes and a.num_classes == b.num_classes
    for f in ("ids", "logits", "counts", "lse", "true_logp", "rest_lse", "rest_mean"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("which", ["topk", "sample", "mixed"])
def test_sparse_stream_equals_memory(caches, which):
    mem = open_cache(caches[which])
    n = mem.num_samples
    with open_cache(caches[which], mode="stream") as st:
        assert st.sparse and st.logits_modes == mem.logits_modes
        for epoch in range(3):  # keyed views: epoch 2 reuses slot 0 (a fresh plan)
            st.start_epoch(epoch, seed=5)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            for batch in perm.split(7):
                slots, _ = mem.epoch_views(epoch, batch, seed=5)
                a, sa = mem.gather(slots, batch, with_stats=True)
                b, sb = st.gather(slots, batch, with_stats=True)
                _same_sparse(a, b)
                assert torch.equal(sa, sb)
                one = [mem.mentors[-1]]
                _same_sparse(mem.gather(slots, batch, mentors=one),
                             st.gather(slots, batch, mentors=one))
        with pytest.raises(ValueError, match="planned slots"):
            st.gather((slots + 1) % mem.num_slots, batch)


@pytest.mark.parametrize("method", ["kd", "classroom"])
@pytest.mark.parametrize("which", ["topk", "sample", "mixed"])
def test_training_streamed_equals_in_memory(caches, tmp_path, which, method):
    """A student trained with --cache-mode stream is the one trained in memory, bit for bit
    (2 epochs: the second is served from the prefetched plan)."""
    from ckd.train import train

    base = dict(dataset="synthetic", dataset_options=dict(n_train=N_TRAIN, n_test=8,
                                                          num_classes=C),
                student="resnet8", epochs=2, batch_size=20, progress=False, device="cpu",
                backend="reference", log_every=1, cache=str(caches[which]), method=method)
    runs = {mode: train(dict(base, cache_mode=mode, out=str(tmp_path / mode)))
            for mode in ("memory", "stream")}
    mem, st = (runs[m]["model"].state_dict() for m in ("memory", "stream"))
    assert mem.keys() == st.keys()
    for k in mem:
        assert torch.equal(mem[k], st[k]), k
    untimed = [[{k: v for k, v in row.items() if k not in ("time_s", "img_per_s")}
                for row in runs[m]["history"]] for m in ("memory", "stream")]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2

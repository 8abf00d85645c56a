"""The row sources behind one interface (`ckd.cache.rows.RowSource`): memory, stream and
blocks return the same rows for the same request (logits in the padded row layout, row
statistics, mentor features, sparse mentors), and refuse what they cannot serve by name."""

from __future__ import annotations

import pytest
import torch

from ckd.cache import RowBatch, RowSource, build_cache, open_cache
from ckd.cache.sources import MODES
from ckd.data import load_dataset
from ckd.models import create_model, save_checkpoint
from ckd.row_align import ROW_ALIGN, padded_width

N_TRAIN, C, SEED = 40, 10, 7  # C = 10 fp16: rows of 20 bytes, padded to 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store: mentors a, b dense with pool features, c stored topk:3."""
    tmp = tmp_path_factory.mktemp("rows")
    ds = load_dataset("synthetic", n_train=N_TRAIN, n_test=8, num_classes=C)
    paths = {}
    for seed, alias in enumerate("abc"):
        torch.manual_seed(seed)
        paths[alias] = save_checkpoint(tmp / f"{alias}.pt", create_model("resnet8", C),
                                       arch="resnet8", num_classes=C, dataset=ds.name,
                                       metrics={})
    kw = dict(views=3, seed=3, dtype="fp16", batch_size=40, samples_per_chunk=16,
              progress=False)
    out = build_cache(ds, {a: paths[a] for a in "ab"}, tmp / "c", features="pool", **kw)
    build_cache(ds, {"c": paths["c"]}, out, logits="topk:3", **kw)
    return out


def _requests(source: RowSource, epochs: int = 3):
    """(epoch, slots, batch) of a shuffled epoch in batches of 7 (the last one short)."""
    for epoch in range(epochs):
        source.start_epoch(epoch, SEED)
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(epoch))
        for batch in perm.split(7):
            yield epoch, source.epoch_views(epoch, batch, SEED)[0], batch


def _same(a: RowBatch, b: RowBatch) -> None:
    if isinstance(a.logits, torch.Tensor):
        assert torch.equal(a.logits, b.logits) and a.logits.dtype == b.logits.dtype
    else:
        assert a.logits.modes == b.logits.modes
        for f in ("ids", "logits", "counts", "lse", "true_logp", "rest_lse", "rest_mean"):
            assert torch.equal(getattr(a.logits, f), getattr(b.logits, f)), f
    assert (a.stats is None) == (b.stats is None)
    assert a.stats is None or torch.equal(a.stats, b.stats)
    assert a.features.keys() == b.features.keys()
    for name in a.features:
        assert all(torch.equal(x, y) for x, y in zip(a.features[name], b.features[name],
                                                     strict=True))


def test_every_source_returns_the_same_dense_rows(store):
    sources = {mode: open_cache(store, mode=mode, mentors=["a", "b"]) for mode in MODES}
    ref = sources["memory"]
    try:
        for mode, src in sources.items():
            assert isinstance(src, RowSource) and src.mode == mode
            assert src.mentors == ["a", "b"] and src.num_classes == C
            for _, slots, batch in _requests(src):
                want = ref.gather_rows(slots, batch, with_stats=True)
                got = src.gather_rows(slots, batch, with_stats=True)
                _same(got, want)
                z = got.logits  # the padded layout: each row on a 16-byte boundary
                assert z.shape == (2, len(batch), C)
                assert z.stride(-2) == padded_width(C, z.dtype)
                assert z.data_ptr() % ROW_ALIGN == 0
                assert got.stats.shape == (2, len(batch), len(src.stat_fields))
                assert got.features == {}
                plain = src.gather_rows(slots, batch)
                assert plain.stats is None and torch.equal(plain.logits, z)
                assert torch.equal(src.gather(slots, batch), z)  # gather: the logits
                one = src.gather(slots, batch, mentors=["b"], with_stats=True)
                assert torch.equal(one[0], z[1:]) and torch.equal(one[1], got.stats[1:])
    finally:
        for src in sources.values():
            src.close()


def test_features_and_sparse_rows_are_what_the_sources_return(store):
    """Features (mentors a, b) and a sparse mentor (c: SparseMentors) are what memory and
    stream return alike; blocks serves dense logits only and says so."""
    for mentors, features in ((["a", "b"], ("pool",)), (["a", "c"], ())):
        mem = open_cache(store, mentors=mentors, features=features)
        with open_cache(store, mode="stream", mentors=mentors, features=features) as st:
            for _, slots, batch in _requests(st, epochs=2):
                a = mem.gather_rows(slots, batch, with_stats=True, features=features)
                b = st.gather_rows(slots, batch, with_stats=True, features=features)
                _same(a, b)
                if features:
                    assert [t.shape for t in a.features["pool"]] == [(len(batch), 64)] * 2
                    assert torch.equal(st.gather_with_features(slots, batch, features)[1]
                                       ["pool"][1], b.features["pool"][1])
                else:
                    assert a.logits.modes == ("topk", "topk")  # a: exact K = C rows
        with pytest.raises(ValueError, match="blocks serves dense logits"):
            open_cache(store, mode="blocks", mentors=mentors, features=features)


def test_requests_a_source_cannot_serve_are_refused(store):
    with pytest.raises(ValueError, match="memory, stream, blocks"):
        open_cache(store, mode="disk")
    with pytest.raises(ValueError, match="window"):
        open_cache(store, mode="blocks", window=0)
    src = open_cache(store, mode="blocks", mentors=["a"])
    idx = torch.arange(4)
    with pytest.raises(KeyError, match="not loaded"):
        src.gather(torch.zeros(4, dtype=torch.long), idx, mentors=["b"])
    with pytest.raises(KeyError, match="features"):
        src.gather_rows(torch.zeros(4, dtype=torch.long), idx, features=("pool",))
    with pytest.raises(ValueError, match="1-D of the same length"):
        src.gather(torch.zeros(3, dtype=torch.long), idx)

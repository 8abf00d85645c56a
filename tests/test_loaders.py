"""Loaders: coverage, reproducibility, ffcv == memory order and content, rank sharding."""

import numpy as np
import pytest
import torch

from ckd.data.datasets import load_dataset
from ckd.data.loaders import epoch_permutation, make_loader

N = 203  # prime-ish on purpose: uneven last batch, not divisible by 2, 3, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ckd.data.beton import write_beton

    ds = load_dataset("synthetic", n_train=N, n_test=10, num_classes=7, seed=5)
    path = write_beton(ds.train, tmp_path_factory.mktemp("beton") / "train.beton")
    return ds.train, path


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def _cat(batches, k):
    return torch.cat([b[k] for b in batches])


def test_memory_loader_covers_every_index_once(data):
    split, _ = data
    loader = make_loader("memory", split, batch_size=32, seed=0)
    assert len(loader) == 7
    batches = _epoch(loader, 0)
    assert [b[0].shape[0] for b in batches] == [32] * 6 + [11]
    idx = _cat(batches, 2)
    assert sorted(idx.tolist()) == list(range(N))
    for img, lab, i in batches:
        assert img.dtype == torch.uint8 and img.shape[1:] == (32, 32, 3)
        assert lab.dtype == torch.int64 and i.dtype == torch.int64
        assert np.array_equal(img.numpy(), split.images[i.numpy()])
        assert np.array_equal(lab.numpy(), split.labels[i.numpy()])


def test_order_reproducible_and_changes_with_epoch(data):
    split, _ = data
    a = make_loader("memory", split, batch_size=50, seed=1)
    b = make_loader("memory", split, batch_size=50, seed=1)
    e0, e1 = _cat(_epoch(a, 0), 2), _cat(_epoch(a, 1), 2)
    assert torch.equal(e0, _cat(_epoch(b, 0), 2))
    assert torch.equal(e1, _cat(_epoch(b, 1), 2))
    assert not torch.equal(e0, e1)
    assert torch.equal(_cat(_epoch(a, 0), 2), e0)  # going back to epoch 0 replays it
    other_seed = make_loader("memory", split, batch_size=50, seed=2)
    assert not torch.equal(_cat(_epoch(other_seed, 0), 2), e0)
    assert torch.equal(e1, epoch_permutation(N, 1, 1))  # pure function of (seed, epoch)
    plain = make_loader("memory", split, batch_size=50, seed=1, shuffle=False)
    assert _cat(_epoch(plain, 3), 2).tolist() == list(range(N))


def test_ffcv_and_memory_agree(data):
    split, path = data
    f = make_loader("ffcv", path, batch_size=40, seed=9)
    m = make_loader("memory", split, batch_size=40, seed=9)
    mb = make_loader("memory", path, batch_size=40, seed=9)  # memory from a .beton
    assert len(f) == len(m) == len(mb) == 6
    for epoch in (0, 1):
        fb, mm, mbb = _epoch(f, epoch), _epoch(m, epoch), _epoch(mb, epoch)
        assert len(fb) == len(mm) == len(mbb) == 6
        for x, y, z in zip(fb, mm, mbb, strict=True):
            for k in range(3):
                assert x[k].dtype == y[k].dtype == z[k].dtype
                assert torch.equal(x[k], y[k]) and torch.equal(y[k], z[k])
    # batches are copies: still intact after the loader ran a further epoch
    kept = _epoch(f, 0)
    _epoch(f, 1)
    assert torch.equal(_cat(kept, 2), _cat(_epoch(m, 0), 2))
    assert np.array_equal(_cat(kept, 0).numpy(), split.images[_cat(kept, 2).numpy()])


def test_ffcv_epoch_left_early_then_full_epoch(data):
    split, path = data
    f = make_loader("ffcv", path, batch_size=16, seed=2)
    for i, _ in enumerate(f):  # abandon the epoch after two batches
        if i == 1:
            break
    full = _cat(_epoch(f, 0), 2)
    assert sorted(full.tolist()) == list(range(N))


def test_ffcv_loader_keeps_torch_thread_count(data):
    """ffcv sets torch's thread count to its worker count when a Loader is made and when an
    epoch starts; the caller's count must survive both."""
    _, path = data
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        f = make_loader("ffcv", path, batch_size=16, seed=2)
        assert torch.get_num_threads() == 1
        for _ in f:
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_drop_last(data):
    split, path = data
    for kind, src in (("memory", split), ("ffcv", path)):
        loader = make_loader(kind, src, batch_size=32, seed=0, drop_last=True)
        assert len(loader) == 6
        batches = _epoch(loader, 0)
        assert [b[0].shape[0] for b in batches] == [32] * 6
        idx = _cat(batches, 2)
        assert idx.unique().numel() == 192


@pytest.mark.parametrize("world_size", [3, 7])
def test_ranks_partition_epoch(data, world_size):
    split, path = data
    shares = []
    for rank in range(world_size):
        loader = make_loader("memory", split, batch_size=8, seed=4, rank=rank,
                             world_size=world_size)
        shares.append(_cat(_epoch(loader, 2), 2))
        assert len(loader) == len(_epoch(loader, 2))
    per_rank = -(-N // world_size)
    assert all(s.numel() == per_rank for s in shares)  # equal share, equal batch count
    allidx = torch.cat(shares)
    assert set(allidx.tolist()) == set(range(N))  # every index seen
    pad = per_rank * world_size - N
    assert allidx.numel() - allidx.unique().numel() == pad  # 7 | 203: exact partition
    # strided share of the one epoch permutation
    perm = epoch_permutation(N, 4, 2)
    padded = torch.cat([perm, perm[:pad]])
    for rank, s in enumerate(shares):
        assert torch.equal(s, padded[rank::world_size])
    if world_size == 3:  # the ffcv backend pads the same way (rank 2 holds the repeat)
        f = make_loader("ffcv", path, batch_size=8, seed=4, rank=2, world_size=3)
        assert torch.equal(_cat(_epoch(f, 2), 2), shares[2])


def test_ranks_drop_last_disjoint(data):
    split, path = data
    shares = [_cat(_epoch(make_loader("memory", split, batch_size=16, seed=4, rank=r,
                                      world_size=3, drop_last=True), 0), 2) for r in range(3)]
    assert [s.numel() for s in shares] == [64, 64, 64]  # 203 // 3 = 67 -> 4 full batches
    allidx = torch.cat(shares)
    assert allidx.unique().numel() == allidx.numel() == 192
    f = make_loader("ffcv", path, batch_size=16, seed=4, rank=1, world_size=3, drop_last=True)
    assert torch.equal(_cat(_epoch(f, 0), 2), shares[1])


def test_bad_arguments(data):
    split, path = data
    with pytest.raises(ValueError, match="valid kinds: ffcv, memory"):
        make_loader("dali", split, batch_size=4, seed=0)
    with pytest.raises(TypeError, match="ckd prepare"):
        make_loader("ffcv", split, batch_size=4, seed=0)
    with pytest.raises(FileNotFoundError, match="ckd prepare"):
        make_loader("ffcv", path.with_name("missing.beton"), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="rank"):
        make_loader("memory", split, batch_size=4, seed=0, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device(data):
    split, path = data
    for kind, src in (("memory", split), ("ffcv", path)):
        loader = make_loader(kind, src, batch_size=64, seed=0, device="cuda")
        cpu = make_loader("memory", split, batch_size=64, seed=0)
        for g, c in zip(_epoch(loader, 1), _epoch(cpu, 1), strict=True):
            assert all(t.is_cuda for t in g)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(g, c, strict=True))

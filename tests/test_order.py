"""Shard-block epoch order: a pure function of (seed, epoch) that visits a cache's sample
blocks (its shards) whole, identical for every world size, and with a bounded-window
reader it reads each shard once per epoch (requests counted by a store wrapper)."""

from __future__ import annotations

import pytest
import torch
from zarr.storage import WrapperStore

from ckd.cache import build_cache, open_cache
from ckd.cache import reader as cache_reader
from ckd.data import load_dataset
from ckd.data.loaders import Loader, epoch_permutation, shard_block_permutation

N, BLOCK = 200, 16  # 13 blocks, the last one short


def test_shard_block_order_is_a_pure_function_of_seed_and_epoch():
    a = shard_block_permutation(N, BLOCK, seed=3, epoch=5)
    assert torch.equal(a, shard_block_permutation(N, BLOCK, seed=3, epoch=5))
    assert torch.equal(a.sort().values, torch.arange(N))  # a permutation
    assert not torch.equal(a, shard_block_permutation(N, BLOCK, seed=3, epoch=6))
    assert not torch.equal(a, shard_block_permutation(N, BLOCK, seed=4, epoch=5))
    blocks = (a // BLOCK).tolist()  # each block is visited in one run of positions
    runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    assert sorted(runs) == list(range(-(-N // BLOCK)))
    assert runs != sorted(runs)  # the blocks themselves are shuffled
    first = a[:BLOCK]
    assert not torch.equal(first, first.sort().values)  # and the samples inside a block


@pytest.mark.parametrize("block", [None, BLOCK])
def test_epoch_order_is_identical_across_world_sizes(block):
    def global_order(world: int, epoch: int) -> torch.Tensor:
        shares = [Loader(N, batch_size=8, seed=1, shuffle=True, drop_last=False,
                          device="cpu", rank=r, world_size=world, block=block).order(epoch)
                  for r in range(world)]
        return torch.stack(shares, 1).reshape(-1)  # rank r took positions r::world

    for epoch in (0, 7):
        want = shard_block_permutation(N, BLOCK, 1, epoch) if block else \
            epoch_permutation(N, 1, epoch)
        for world in (1, 2, 4, 8):  # 200 divides by each: no padding
            assert torch.equal(global_order(world, epoch), want), (world, epoch)


class CountingStore(WrapperStore):
    """Counts the chunk reads (`get` of a key with a /c/ segment) a reader makes."""

    chunk_gets = 0

    def __init__(self, store):
        super().__init__(store)

    async def get(self, key, prototype, byte_range=None):
        if "/c/" in key:
            CountingStore.chunk_gets += 1
        return await self._store.get(key, prototype, byte_range)


@pytest.fixture(scope="module")
def block_cache(tmp_path_factory):
    from ckd.models import create_model, save_checkpoint

    tmp = tmp_path_factory.mktemp("order")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "r8.pt", create_model("resnet8", 5), arch="resnet8",
                           num_classes=5, dataset="synthetic", metrics={})
    ds = load_dataset("synthetic", n_train=N, n_test=8, num_classes=5)
    return build_cache(ds, {"r8": ckpt}, tmp / "c", views=2, samples_per_chunk=BLOCK,
                       progress=False)


def test_shard_blocks_read_each_shard_once_per_epoch(block_cache, monkeypatch):
    path = block_cache
    real = cache_reader.zarr_store
    monkeypatch.setattr(cache_reader, "zarr_store",
                        lambda *a, **k: CountingStore(real(*a, **k)))
    ref = open_cache(path)
    blocks = -(-N // BLOCK)

    def epoch_requests(order_block: int | None, epoch: int = 3) -> int:
        reader = open_cache(path, mode="blocks", window=2)
        loader = Loader(N, batch_size=16, seed=0, shuffle=True, drop_last=False,
                         device="cpu", rank=0, world_size=1, block=order_block)
        CountingStore.chunk_gets = 0
        order = loader.order(epoch)
        slots, _ = reader.epoch_views(epoch, order, 0)
        for s in range(0, N, 16):
            got = reader.gather(slots[s:s + 16], order[s:s + 16], with_stats=True)
            want = ref.gather(slots[s:s + 16], order[s:s + 16], with_stats=True)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        reader.close()
        return CountingStore.chunk_gets

    shard = epoch_requests(BLOCK)
    assert shard == blocks * 2  # one unit per block (one slot an epoch): logits + stats
    rand = epoch_requests(None)
    assert rand > 4 * shard  # a random order refetches blocks: ~ one per row


def test_stream_mode_reads_blocks_in_the_epoch_order(tmp_path):
    from ckd.cache.layout import make_layout
    from ckd.cache.stream import need_order

    lay = make_layout(2, N, 5, keyed=True, samples_per_chunk=BLOCK)
    order = shard_block_permutation(N, BLOCK, 0, 1)
    blocks = need_order(order, lay)
    assert blocks[0] == int(order[0]) // BLOCK and sorted(blocks) == list(range(13))
    assert need_order(order[:BLOCK], lay)[0] == int(order[0]) // BLOCK  # needed first


def test_train_with_shard_block_order(block_cache, tmp_path):
    """`--order shard-blocks` trains the same student whichever reader serves the rows:
    memory, stream, or blocks (a window of whole chunks read on demand)."""
    from ckd.train import train

    states = {}
    for mode in ("memory", "stream", "blocks"):
        res = train(dict(dataset="synthetic", dataset_options=dict(n_train=N, n_test=8,
                                                                  num_classes=5),
                         student="resnet8", method="kd", cache=str(block_cache),
                         cache_mode=mode, order="shard-blocks", epochs=1, batch_size=50,
                         device="cpu", progress=False, backend="reference",
                         out=str(tmp_path / mode)))
        assert res["steps"] == 4
        states[mode] = res["model"].state_dict()
    for mode in ("stream", "blocks"):
        for k, v in states["memory"].items():
            assert torch.equal(v, states[mode][k]), (mode, k)
    assert "order: shard-blocks" in (tmp_path / "blocks" / "config.yaml").read_text()


def test_train_order_shard_blocks_needs_a_cache():
    from ckd.train import load_config
    from ckd.train.setup import make_loaders

    cfg = load_config(dataset="synthetic", order="shard-blocks")
    with pytest.raises(ValueError, match="--order shard-blocks.*--cache"):
        make_loaders(cfg, load_dataset("synthetic", n_train=16, n_test=8), "cpu", 0, 1)

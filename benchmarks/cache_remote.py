"""Object-store part of benchmarks/cache.py (`--remote`): read rows/s from a local store vs
the same store on moto's S3 server over loopback HTTP, and chunk requests per epoch for a
random vs a shard-block epoch order.

    .venv/bin/python benchmarks/cache.py --remote [--quick]

Loopback moto is an in-process Python server: it measures the request count and the
client-side cost of the object-store path, not a real S3 region's latency or bandwidth.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from zarr.storage import WrapperStore

from ckd.cache import build_cache, open_cache
from ckd.cache import reader as cache_reader
from ckd.cache.copy import copy_cache
from ckd.data import load_dataset
from ckd.data.loaders import epoch_permutation, shard_block_permutation
from ckd.models import create_model, save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class CountingStore(WrapperStore):
    """Counts chunk reads (`get` of a key with a /c/ segment)."""

    chunk_gets = 0

    async def get(self, key, prototype, byte_range=None):
        if "/c/" in key:
            CountingStore.chunk_gets += 1
        return await self._store.get(key, prototype, byte_range)


def _counted() -> None:
    real = cache_reader.zarr_store
    if getattr(real, "counting", False):
        return

    def wrapped(*a, **k):
        return CountingStore(real(*a, **k))

    wrapped.counting = True
    cache_reader.zarr_store = wrapped


def _timed(fn: Callable[[], object]) -> tuple[object, float, int]:
    CountingStore.chunk_gets = 0
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, CountingStore.chunk_gets


def remote_bench(say: Callable[[str], None], quick: bool) -> None:
    from s3_server import create_bucket, moto_s3

    n, views, spc, batch = (2048, 2, 256, 128) if quick else (8192, 4, 512, 256)
    mentors = 2
    tmp = Path(tempfile.mkdtemp(prefix="ckd-remote-bench-"))
    ds = load_dataset("synthetic", n_train=n, n_test=64, num_classes=100)
    paths = {}
    for m in range(mentors):
        torch.manual_seed(m)
        paths[f"m{m}"] = save_checkpoint(tmp / f"m{m}.pt", create_model("resnet8", 100),
                                         arch="resnet8", num_classes=100, dataset=ds.name,
                                         metrics={})
    t = time.perf_counter()
    local = build_cache(ds, paths, tmp / "local", views=views, samples_per_chunk=spc,
                        progress=False)
    say(f"\n## Local store vs loopback S3 (moto)\n\n{mentors} resnet8 mentors (untrained), "
        f"synthetic {n} samples x {views} keyed views x 100 classes fp16, "
        f"{spc} samples per chunk ({-(-n // spc)} shards); built locally in "
        f"{time.perf_counter() - t:.1f} s. A row = one mentor's logits of one sample.\n")
    _counted()
    with moto_s3() as env:
        os.environ.update(env)
        create_bucket(env, "bench")
        url = "s3://bench/cache"
        rep, dt, _ = _timed(lambda: copy_cache(local, url))
        say(f"- `ckd cache copy` local -> S3: {rep.bytes_copied / 2**20:.1f} MiB in "
            f"{rep.files} objects, {dt:.1f} s ({rep.bytes_copied / 2**20 / dt:.1f} MiB/s)")
        rows_all = mentors * views * n
        for where, path in (("local", local), ("S3", url)):
            c, dt, gets = _timed(lambda p=path: open_cache(p, mode="memory"))
            say(f"- memory mode, {where}: open + checks + load {dt:.2f} s, "
                f"{rows_all / dt / 1e3:.0f} k rows/s, {gets} chunk requests")
        for where, path in (("local", local), ("S3", url)):
            cache = open_cache(path, mode="stream")
            order = epoch_permutation(n, 0, 1)
            slots, _ = cache.epoch_views(1, order, 0)

            def epoch(cache=cache, order=order, slots=slots) -> None:
                cache.start_epoch(1, 0, order)
                for s in range(0, n, batch):
                    cache.gather(slots[s:s + batch], order[s:s + batch])

            _, dt, gets = _timed(epoch)
            say(f"- stream mode, {where}: one epoch (random order, batch {batch}) "
                f"{dt:.2f} s, {mentors * n / dt / 1e3:.0f} k rows/s, {gets} chunk requests "
                "counted during the epoch")
            cache.close()
        say(f"\n### Requests per epoch: --cache-mode blocks (window of 4 units), batch {batch}\n")
        say("| store | order | chunk requests | units read | rows/s |")
        say("|---|---|---|---|---|")
        for where, path in (("local", local), ("S3", url)):
            for name, order in (("random", epoch_permutation(n, 0, 1)),
                                ("shard-blocks", shard_block_permutation(n, spc, 0, 1))):
                reader = open_cache(path, mode="blocks", window=4)
                slots, _ = reader.epoch_views(1, order, 0)

                def run(reader=reader, order=order, slots=slots) -> None:
                    for s in range(0, n, batch):
                        reader.gather(slots[s:s + batch], order[s:s + batch])

                _, dt, gets = _timed(run)
                say(f"| {where} | {name} | {gets} | {reader.reads} | "
                    f"{mentors * n / dt / 1e3:.0f} k |")
                reader.close()

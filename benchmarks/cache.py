"""Logit-cache benchmark: layout/codec study on real (briefly trained) mentor logits, write
throughput against bare mentor inference, compressed vs raw size, gather rows/s in
memory and stream modes.

    .venv/bin/python benchmarks/cache.py [--quick] [--out FILE.md]   (see benchmarks/RESULTS.md)
    .venv/bin/python benchmarks/cache.py --remote [--quick]   (local vs loopback S3, requests
                                                            per epoch: cache_remote.py)
    .venv/bin/python benchmarks/cache.py --build [--device cuda] [--precision fp16] ...
        (build_cache vs each mentor's bare forward: cache_build.py)

CPU only here (no CUDA on the machine this was written on); every number it prints is
measured by this script on the machine that runs it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from ckd.cache import build_cache, open_cache
from ckd.cache.layout import make_layout, root_attributes
from ckd.data import NUM_VIEWS, RECIPE, apply_views, load_dataset, view_ids
from ckd.hashing import epoch_seed
from ckd.models import create_model, save_checkpoint

LINES: list[str] = []


def say(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def train_mentor(arch: str, ds, epochs: int, seed: int) -> torch.nn.Module:
    """A plain SGD loop on keyed views (ckd.train is a separate stage)."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    imgs, labels = torch.from_numpy(ds.train.images), torch.from_numpy(ds.train.labels)
    n = len(imgs)
    for e in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(e))
        for idx in perm.split(128):
            x = apply_views(imgs[idx], view_ids(epoch_seed(seed, e), idx), ds.mean, ds.std)
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def all_view_logits(model: torch.nn.Module, ds, n: int, bs: int) -> tuple[np.ndarray, float]:
    """[162, n, C] float32 logits of every view of the first n samples; bare img/s."""
    imgs = torch.from_numpy(ds.train.images[:n])
    idx = torch.arange(n).repeat(NUM_VIEWS)
    vids = torch.arange(NUM_VIEWS).repeat_interleave(n)
    out = torch.empty(len(idx), ds.num_classes)
    t = time.perf_counter()
    for s in range(0, len(idx), bs):
        out[s:s + bs] = model(apply_views(imgs[idx[s:s + bs]], vids[s:s + bs], ds.mean, ds.std))
    dt = time.perf_counter() - t
    return out.reshape(NUM_VIEWS, n, -1).numpy(), len(idx) / dt


def codec_variants() -> dict[str, tuple[list, list]]:
    """name -> (filters, compressors) for chunks holding all 162 views of a sample block;
    every variant ends with the crc32c checksum codec."""
    nsc = [TransposeCodec(order=(1, 0, 2))]  # store the chunk as [samples, views, classes]
    crc = Crc32cCodec()

    def blosc(cname: str, level: int, shuffle: str = "shuffle") -> BloscCodec:
        return BloscCodec(cname=cname, clevel=level, typesize=2, shuffle=shuffle)

    return {
        "no compression": ([], [crc]),
        "blosc-zstd3+shuffle, chunk stored [S,n,C]": ([], [blosc("zstd", 3), crc]),
        "blosc-zstd3+shuffle, chunk stored [n,S,C]": (nsc, [blosc("zstd", 3), crc]),
        "blosc-zstd1+shuffle, [n,S,C]": (nsc, [blosc("zstd", 1), crc]),
        "blosc-zstd5+shuffle, chunk stored [S,n,C]": ([], [blosc("zstd", 5), crc]),
        "**blosc-zstd5+shuffle, [n,S,C] (default)**": (nsc, [blosc("zstd", 5), crc]),
        "blosc-zstd9+shuffle, [n,S,C]": (nsc, [blosc("zstd", 9), crc]),
        "blosc-zstd5+bitshuffle, [n,S,C]": (nsc, [blosc("zstd", 5, "bitshuffle"), crc]),
        "blosc-lz4+shuffle, [n,S,C]": (nsc, [blosc("lz4", 5), crc]),
        "zstd1 (no shuffle), [n,S,C]": (nsc, [ZstdCodec(level=1), crc]),
        "zstd3 (no shuffle), [n,S,C]": (nsc, [ZstdCodec(level=3), crc]),
        "zstd9 (no shuffle), [n,S,C]": (nsc, [ZstdCodec(level=9), crc]),
    }


def codec_study(logits: dict[str, np.ndarray], tmp: Path) -> None:
    say("\n## Layout and codec on real mentor logits (fp16)\n")
    say("| layout / codec | ratio | write MB/s (raw) | read MB/s (raw) |")
    say("|---|---|---|---|")
    arrs = {k: v.astype(np.float16) for k, v in logits.items()}
    raw = sum(a.nbytes for a in arrs.values())
    for name, (filters, comps) in codec_variants().items():
        size = tw = tr = 0.0
        for k, a in arrs.items():
            path = tmp / f"codec-{abs(hash(name))}-{k}"
            z = zarr.create_array(str(path), shape=a.shape, chunks=a.shape,
                                  dtype="float16", filters=filters,
                                  serializer=BytesCodec(endian="little"), compressors=comps,
                                  fill_value=0, overwrite=True)
            t = time.perf_counter()
            z[:] = a
            tw += time.perf_counter() - t
            t = time.perf_counter()
            back = z[:]
            tr += time.perf_counter() - t
            assert np.array_equal(back, a)
            size += sum(p.stat().st_size for p in (path / "c").rglob("*") if p.is_file())
            shutil.rmtree(path)
        say(f"| {name} | {raw / size:.2f}x | {raw / tw / 1e6:.0f} | {raw / tr / 1e6:.0f} |")


def subset(ds, n: int):
    from ckd.data import Dataset, Split

    return Dataset(ds.name, Split(ds.train.images[:n], ds.train.labels[:n]), ds.test,
                   ds.num_classes, ds.mean, ds.std)


def write_vs_inference(ds, ckpt: Path, model: torch.nn.Module, n: int, bs: int,
                       tmp: Path, reps: int) -> None:
    say("\n## Write throughput vs bare inference (one mentor, --views all)\n")
    sub = subset(ds, n)
    imgs = NUM_VIEWS * n + len(sub.test)
    import ckd.cache.writer as writer

    real_load = writer.load_mentor
    fwd = [0.0]

    def timed_load(*a, **kw):  # time every mentor forward inside build_cache itself
        model = real_load(*a, **kw)
        inner = model.forward

        def forward(x):
            t0 = time.perf_counter()
            y = inner(x)
            fwd[0] += time.perf_counter() - t0
            return y

        model.forward = forward
        return model

    bare_t, build_t, frac = [], [], []
    writer.load_mentor = timed_load
    try:
        for r in range(reps):  # alternate, keep the best of each: the CPU is shared
            t = time.perf_counter()
            all_view_logits(model, sub, n, bs)
            writer.test_accuracy(model, sub.test.images, sub.test.labels, sub.mean, sub.std,
                                 bs, torch.device("cpu"))
            bare_t.append(time.perf_counter() - t)
            out = tmp / f"wcache{r}"
            fwd[0] = 0.0
            t = time.perf_counter()
            build_cache(sub, {"m": ckpt}, out, views="all", batch_size=bs, progress=False)
            build_t.append(time.perf_counter() - t)
            frac.append(fwd[0] / build_t[-1])
    finally:
        writer.load_mentor = real_load
    raw = NUM_VIEWS * n * ds.num_classes * 2
    disk = sum(p.stat().st_size for p in (out / "mentors" / "m" / "logits").rglob("*")
               if p.is_file())
    say(f"- {n} samples x 162 views + {len(sub.test)} test images = {imgs} images, batch "
        f"{bs}, best of {reps}: bare inference {imgs / min(bare_t):.0f} img/s "
        f"({min(bare_t):.1f} s), build_cache {imgs / min(build_t):.0f} img/s "
        f"({min(build_t):.1f} s, store set-up, checkpoint load and hashing included)")
    say(f"- time inside the mentor's forward during build_cache (timed in the same run): "
        f"{', '.join(f'{100 * f:.1f}%' for f in frac)} of its wall time")
    say(f"- fp16 logits: raw {raw / 2**20:.2f} MiB, on disk {disk / 2**20:.2f} MiB "
        f"({raw / disk:.2f}x)")


def synthetic_store(path: Path, logits: np.ndarray, n: int, mentors: int) -> None:
    """A big cache made by tiling real all-view logits (reader speed does not depend on
    the values, only on sizes and compressibility), written unit by unit through the
    cache's own writer (checksums, stats, markers, digests: what the reader checks)."""
    from ckd.cache.store import _init_mentor, _init_root, _mentor_attrs
    from ckd.cache.writer import UnitWriter, record_mentor_digest

    s, n0, c = logits.shape
    lay = make_layout(s, n, c, keyed=False)
    attrs = root_attributes(dataset_name="bench", fingerprint="0" * 16, num_samples=n,
                            num_test=0, num_classes=c, recipe=RECIPE, keyed=False,
                            num_slots=s, seeds=None, mean=(0.5,) * 3, std=(0.25,) * 3,
                            layout=lay)
    path.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % c
    _init_root(path, attrs, labels, None)
    f16 = logits.astype(np.float16)
    for m in range(mentors):
        alias = f"m{m}"
        meta = _mentor_attrs(alias, "tiled", Path("none"), "0" * 64, c)
        _init_mentor(path, alias, lay, meta)
        writer = UnitWriter(path, alias, lay, labels)
        for a, b in lay.units():
            rng = lay.sample_range(b)
            reps = -(-len(rng) // n0)
            vals = np.roll(np.tile(f16, (1, reps, 1))[:, : len(rng)], m, axis=2)
            writer.write(a, b, np.ascontiguousarray(vals), np.zeros(s, np.int32))
        zarr.open_group(str(path / "mentors" / alias), mode="r+").attrs.put(
            {**meta, "complete": True})
        record_mentor_digest(path, alias)


def gather_bench(path: Path, n: int, mentors: int, batch: int) -> None:
    say(f"\n## Gather ({mentors} mentors x 162 views x {n} samples x 100 classes fp16, "
        f"batch {batch}; a row = one mentor's logits of one sample)\n")
    t = time.perf_counter()
    mem = open_cache(path, mode="memory")
    say(f"- memory mode: load (decompress) {time.perf_counter() - t:.1f} s for "
        f"{mem._buf.numel() * 2 / 2**20:.0f} MiB")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for e in range(2):
        perm = torch.randperm(n, generator=gen)
        batches += [(e, idx) for idx in perm.split(batch)]
    views = [(mem.epoch_views(e, idx, seed=0)[0], idx) for e, idx in batches]
    for sl, idx in views[:20]:
        mem.gather(sl, idx)
    t = time.perf_counter()
    for sl, idx in views:
        mem.gather(sl, idx)
    dt = time.perf_counter() - t
    rows = sum(len(idx) for _, idx in views) * mentors
    say(f"- memory mode gather: {rows / dt / 1e6:.2f} M rows/s "
        f"({dt / len(views) * 1e3:.3f} ms per batch, torch threads {torch.get_num_threads()})")
    with open_cache(path, mode="stream") as st:
        t = time.perf_counter()
        for e in range(2):
            st.start_epoch(e, seed=0)
            t_epoch = time.perf_counter()
            for (ee, idx), (sl, _) in zip(batches, views, strict=True):
                if ee == e:
                    st.gather(sl, idx)
            if e == 0:
                first = time.perf_counter() - t_epoch
        total = time.perf_counter() - t
        st.start_epoch(2, seed=0)  # epoch 2 was prefetched during epoch 1: time a hot epoch
        perm = torch.randperm(n, generator=gen)
        hot = [(mem.epoch_views(2, idx, seed=0)[0], idx) for idx in perm.split(batch)]
        time.sleep(0.1)
        st._current.ready[-1].wait()
        t = time.perf_counter()
        for sl, idx in hot:
            st.gather(sl, idx)
        dt = time.perf_counter() - t
    say(f"- stream mode: first epoch (cold, waits for the reader) {first:.1f} s, 2 epochs "
        f"{total:.1f} s (the store is read once per epoch: "
        f"{n / (total / 2):.0f} samples/s per epoch pass)")
    say(f"- stream mode gather once the epoch is read: "
        f"{len(hot) * batch * mentors / dt / 1e6:.2f} M rows/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--dataset", default="digits", choices=["digits", "synthetic"],
                    help="mentor training data (digits: real images, 10 classes; "
                         "synthetic: 100 classes)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--remote", action="store_true",
                    help="only the object-store part: local vs loopback S3 (moto) read "
                         "rows/s, requests per epoch random vs shard-block order")
    ap.add_argument("--build", action="store_true",
                    help="only build_cache vs each mentor's bare forward (cache_build.py)")
    ap.add_argument("--mentors", default="resnet110,resnet8,resnet14,ShuffleV2,MobileNetV2,"
                    "ShuffleV1", help="--build: mentor archs (random weights)")
    ap.add_argument("--n", type=int, default=512, help="--build: training images")
    ap.add_argument("--views", type=int, default=2, help="--build: keyed views an image")
    ap.add_argument("--n-test", type=int, default=64, help="--build: test images")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="--build: images a forward (default: build_cache's choice)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--reps", type=int, default=2, help="--build: best of")
    args = ap.parse_args()
    q = args.quick
    if args.build:
        from cache_build import build_bench

        say("# Logit cache build vs bare mentor forwards\n\nCommand: `.venv/bin/python "
            f"benchmarks/cache.py --build --mentors {args.mentors} --n {args.n} --views "
            f"{args.views} --n-test {args.n_test} --precision {args.precision} --device "
            f"{args.device} --dtype {args.dtype} --reps {args.reps}"
            + (f" --batch-size {args.batch_size}" if args.batch_size else "") + "`")
        build_bench(say, archs=args.mentors.split(","), n=args.n, n_test=args.n_test,
                    views=args.views, batch=args.batch_size, precision=args.precision,
                    device=args.device, dtype=args.dtype, reps=args.reps)
        if args.out:
            args.out.write_text("\n".join(LINES) + "\n")
        return
    if args.remote:
        from cache_remote import remote_bench

        say("# Logit cache on an object store\n\nCommand: `.venv/bin/python benchmarks/"
            f"cache.py --remote{' --quick' if q else ''}`; CPU only, {os.cpu_count()} cores; "
            f"load average before: {os.getloadavg()[0]:.2f}")
        remote_bench(say, q)
        say(f"\nload average after: {os.getloadavg()[0]:.2f}")
        if args.out:
            args.out.write_text("\n".join(LINES) + "\n")
        return
    epochs, n_views_samples, reps = (1, 32, 1) if q else (6, 128, 3)
    big_n, big_m = (2048, 2) if q else (16384, 2)
    say("# Logit cache benchmark\n")
    say(f"Device: CPU only, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
        f"zarr {zarr.__version__}.")
    say(f"Command: `.venv/bin/python benchmarks/cache.py --dataset {args.dataset}"
        f"{' --quick' if q else ''}`")
    ds = (load_dataset("digits") if args.dataset == "digits" else
          load_dataset("synthetic", n_train=2048, n_test=256, num_classes=100))
    tmp = Path(tempfile.mkdtemp(prefix="ckd-cache-bench-"))
    try:
        say(f"\n## Mentors ({ds.name}: {len(ds.train)} train images, {ds.num_classes} "
            "classes; plain SGD on keyed views)\n")
        logits, models = {}, {}
        for k, arch in enumerate(("resnet8", "resnet14", "resnet20")):
            t = time.perf_counter()
            model = train_mentor(arch, ds, epochs, seed=k)
            tt = time.perf_counter() - t
            logits[arch], bare = all_view_logits(model, ds, n_views_samples, 512)
            models[arch] = model
            acc = (logits[arch].argmax(-1) == ds.train.labels[None, :n_views_samples]).mean()
            say(f"- {arch}: trained {epochs} epochs in {tt:.0f} s; top-1 over all 162 views of "
                f"{n_views_samples} train images {100 * acc:.1f}%; bare inference "
                f"{bare:.0f} img/s (batch 512)")
        codec_study(logits, tmp)
        ckpt = tmp / "r8.pt"
        save_checkpoint(ckpt, models["resnet8"], arch="resnet8", num_classes=ds.num_classes,
                        dataset=ds.name, metrics={})
        write_vs_inference(ds, ckpt, models["resnet8"], n_views_samples, 512, tmp, reps)
        store = tmp / "big"
        t = time.perf_counter()
        c100 = np.concatenate([logits["resnet8"]] * (100 // ds.num_classes), axis=2)[..., :100]
        synthetic_store(store, c100, big_n, big_m)
        say(f"\n(reader store built by tiling the resnet8 logits to 100 classes: {big_m} "
            f"mentors, written in {time.perf_counter() - t:.1f} s)")
        gather_bench(store, big_n, big_m, 256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        args.out.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()

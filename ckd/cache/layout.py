"""The logit-cache store: schema, codecs, attributes and compatibility checks.

One Zarr v3 group (any zarr client opens it; layout in docs/CACHE_FORMAT.md):

    <root>/zarr.json                root attributes (format, dataset, views, normalization)
    <root>/labels                   int64 [N]
    <root>/view_ids                 int16 [K, N]   (keyed mode only: the view of slot k)
    <root>/mentors/<alias>/logits   fp16|fp32 [S, N, C]   S view slots per sample
    <root>/mentors/<alias>/train_correct  int32 [S, n_blocks]  per-chunk completion marker
                                    (= correct top-1 count of that chunk, -1 = not done)

A *work unit* is one chunk of `logits`: (slot chunk a, sample block b). Its marker chunk
in `train_correct` is written only after the logits chunk, so "marker present" means
"chunk complete" (zarr's LocalStore writes every file via tmp + rename).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

FORMAT = "ckd-logit-cache"
VERSION = 1
SEED_MIX = 1_000_003  # epoch seed = seed * SEED_MIX + epoch (same mix online and cached)
DTYPES = {"fp16": "float16", "fp32": "float32"}
TARGET_CHUNK_BYTES = 8 << 20  # ~8 MiB raw per logits chunk: big enough to compress well,
#                               small enough that a kill -9 loses little work

# Measured on real mentor logits (benchmarks/cache.py, benchmarks/RESULTS.md).
# Measured on trained mentors' fp16 logits (benchmarks/cache.py, RESULTS.md): fp16 logits
# hold little redundancy (ratio 1.1-1.35x); blosc zstd-5 with byte shuffle gives ~1.24x at
# ~80 MB/s encode (~400k CIFAR-100 rows/s per core, far above mentor inference) and
# ~1 GB/s decode; zstd-9 squeezes ~1.35x but encodes at ~14 MB/s.
CODECS: dict[str, dict[str, Any]] = {
    "blosc-zstd1": dict(cname="zstd", clevel=1),
    "blosc-zstd3": dict(cname="zstd", clevel=3),
    "blosc-zstd5": dict(cname="zstd", clevel=5),
    "blosc-zstd9": dict(cname="zstd", clevel=9),
    "blosc-lz4": dict(cname="lz4", clevel=5),
    "zstd1": dict(level=1),
    "zstd3": dict(level=3),
    "zstd9": dict(level=9),
    "none": {},
}
DEFAULT_CODEC = "blosc-zstd5"


class CacheMismatchError(ValueError):
    """The cache was built for other data (fingerprint, view recipe, class count...)."""


def epoch_seed(seed: int, epoch: int) -> int:
    """Augmentation seed of epoch `epoch` for a run seeded `seed` (a pure mix).

    Keyed caches use `epoch_seed(seed, k)` for slot k, so epoch e < K of a K-view cache
    sees exactly the views an online run (or an --views all cache) sees in epoch e."""
    return int(seed) * SEED_MIX + int(epoch)


@dataclass(frozen=True)
class Layout:
    """Shape and chunking of every mentor's `logits` array."""

    num_slots: int  # S
    num_samples: int  # N
    num_classes: int  # C
    slots_per_chunk: int
    samples_per_chunk: int
    dtype: str  # "float16" | "float32"
    codec: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_slots, self.num_samples, self.num_classes)

    @property
    def chunks(self) -> tuple[int, int, int]:
        return (self.slots_per_chunk, self.samples_per_chunk, self.num_classes)

    @property
    def grid(self) -> tuple[int, int]:
        """(slot chunks, sample blocks)."""
        return (-(-self.num_slots // self.slots_per_chunk),
                -(-self.num_samples // self.samples_per_chunk))

    def units(self) -> list[tuple[int, int]]:
        """All work units (a, b) in chunk order (sample block major, then slot chunk)."""
        na, nb = self.grid
        return [(a, b) for b in range(nb) for a in range(na)]

    def slot_range(self, a: int) -> range:
        return range(a * self.slots_per_chunk,
                     min((a + 1) * self.slots_per_chunk, self.num_slots))

    def sample_range(self, b: int) -> range:
        return range(b * self.samples_per_chunk,
                     min((b + 1) * self.samples_per_chunk, self.num_samples))

    def to_attrs(self) -> dict[str, Any]:
        return dict(slots_per_chunk=self.slots_per_chunk,
                    samples_per_chunk=self.samples_per_chunk, codec=self.codec)


def make_layout(num_slots: int, num_samples: int, num_classes: int, *, keyed: bool,
                dtype: str = "float16", codec: str = DEFAULT_CODEC,
                samples_per_chunk: int | None = None) -> Layout:
    """Chunking rule: in `all` mode a chunk holds every view of a block of samples (the
    views of one sample are nearly equal, which compresses; the stream reader needs one
    random view per sample anyway, so it reads everything). In keyed mode a chunk holds
    one slot (an epoch uses one slot for all samples: stream mode reads 1/K of the store).
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    spc = 1 if keyed else num_slots
    itemsize = 2 if dtype == "float16" else 4
    if samples_per_chunk is None:
        samples_per_chunk = max(64, TARGET_CHUNK_BYTES // (spc * num_classes * itemsize))
        samples_per_chunk = 1 << (samples_per_chunk.bit_length() - 1)  # power of two
    samples_per_chunk = max(1, min(int(samples_per_chunk), num_samples))
    return Layout(num_slots, num_samples, num_classes, spc, samples_per_chunk, dtype, codec)


def logits_codecs(layout: Layout) -> dict[str, Any]:
    """zarr `create_array` codec kwargs: in-chunk transpose to [samples, slots, classes]
    (views of one sample adjacent), compressor, then a crc32c checksum of the compressed
    bytes (verified on every read)."""
    filters = [TransposeCodec(order=(1, 0, 2))] if layout.slots_per_chunk > 1 else []
    cfg = CODECS[layout.codec]
    itemsize = 2 if layout.dtype == "float16" else 4
    if layout.codec.startswith("blosc"):
        comp = [BloscCodec(typesize=itemsize, shuffle="shuffle", **cfg)]
    elif layout.codec.startswith("zstd"):
        comp = [ZstdCodec(**cfg)]
    else:
        comp = []
    return dict(filters=filters, serializer=BytesCodec(endian="little"),
                compressors=[*comp, Crc32cCodec()])


def root_attributes(*, dataset_name: str, fingerprint: str, num_samples: int,
                    num_test: int, num_classes: int, recipe: dict, keyed: bool,
                    num_slots: int, seeds: Sequence[int] | None, mean: Sequence[float],
                    std: Sequence[float], layout: Layout,
                    params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": {"name": dataset_name, "fingerprint": fingerprint,
                    "num_train": int(num_samples), "num_test": int(num_test),
                    "params": dict(params or {})},  # e.g. synthetic's generation kwargs
        "num_samples": int(num_samples),
        "num_classes": int(num_classes),
        "views": {"recipe": dict(recipe), "mode": "keyed" if keyed else "all",
                  "num_slots": int(num_slots),
                  "seeds": None if seeds is None else [int(s) for s in seeds],
                  "seed_mix": SEED_MIX},
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "dtype": layout.dtype,
        "layout": layout.to_attrs(),
    }


def layout_from_attrs(attrs: dict[str, Any]) -> Layout:
    lay = attrs["layout"]
    return Layout(attrs["views"]["num_slots"], attrs["num_samples"], attrs["num_classes"],
                  lay["slots_per_chunk"], lay["samples_per_chunk"], attrs["dtype"],
                  lay["codec"])


def read_root_attrs(path: str) -> dict[str, Any]:
    """Root attributes of a cache, with a clear error when `path` is not one."""
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise FileNotFoundError(
            f"no logit cache at {path}: build one with `ckd cache-logits --out {path} ...`"
        ) from err
    attrs = root.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise CacheMismatchError(f"{path} is a zarr group but not a {FORMAT} store "
                                 f"(format={attrs.get('format')!r})")
    if attrs.get("version") != VERSION:
        raise CacheMismatchError(
            f"{path} has cache format version {attrs.get('version')}, this ckd reads "
            f"version {VERSION}: rebuild it with `ckd cache-logits --out {path} --overwrite`")
    return attrs


def check_compatible(attrs: dict[str, Any], *, dataset_name: str | None = None,
                     fingerprint: str | None = None, num_classes: int | None = None,
                     recipe: dict | None = None, path: str = "the cache") -> None:
    """Raise `CacheMismatchError` naming every mismatch and the fix."""
    problems = []
    ds = attrs["dataset"]
    if dataset_name is not None and ds["name"] != dataset_name:
        problems.append(f"dataset name: cache {ds['name']!r}, requested {dataset_name!r}")
    if fingerprint is not None and ds["fingerprint"] != fingerprint:
        problems.append(f"dataset fingerprint: cache {ds['fingerprint']}, data {fingerprint} "
                        "(different images/labels, or another subset)")
    if num_classes is not None and attrs["num_classes"] != int(num_classes):
        problems.append(f"class count: cache {attrs['num_classes']}, requested {num_classes}")
    if recipe is not None and attrs["views"]["recipe"] != dict(recipe):
        problems.append(f"view recipe: cache {attrs['views']['recipe']}, code {dict(recipe)}")
    if problems:
        raise CacheMismatchError(
            f"{path} does not match: " + "; ".join(problems)
            + ". Rebuild it for this data (`ckd cache-logits --out NEW_PATH ...`, or "
            "--overwrite) or point to the cache built for it.")

"""The logit-cache store, version 2: schema, codecs, attributes and compatibility checks.

One Zarr v3 group (any zarr client opens it; the format is described in
docs/CACHE_FORMAT.md, the single description of it):

    <root>/zarr.json                      root attributes (format, dataset, views, digests)
    <root>/labels                         int64 [N]
    <root>/view_ids                       int16 [K, N]   (keyed mode only: view of slot k)
    <root>/mentors/<alias>/<array>        one per `MENTOR_ARRAYS` declaration, [S, N, ...]
                                          (logits fp16|fp32 [S, N, C], stats fp32 [S, N, K])
    <root>/mentors/<alias>/train_correct  int32 [S, n_blocks]  correct top-1 per chunk
    <root>/mentors/<alias>/unit_crc32c    int64 [n_slot_chunks, n_blocks, arrays + 1]  marker

A *work unit* is one chunk (slot chunk a, sample block b) of every declared array. Its
marker `unit_crc32c[a, b]` (a crc32c of each array's decoded values, -1 = not done) is
written last, so "marker present, every chunk file present and matching the marker"
means "unit complete". Every array carries a crc32c codec; the root attributes hold a
sha256 of each complete mentor's metadata and unit markers (`digests`).

To add a per-mentor array: add an `ArraySpec` to `MENTOR_ARRAYS` (name, dtype, per-row
shape, codec, how to compute it from the unit's values). Writer, reader, verify and
`ckd cache upgrade` pick it up from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from ckd.data.protocol import recipe_for
from ckd.hashing import SEED_MIX

from .location import CacheRef, cache_location
from .mentor_stats import STAT_FIELDS, stored_row_stats

FORMAT = "ckd-logit-cache"
VERSION = 2
LOCK_FILE = ".ckd-writer.lock"  # fcntl lock of the one writer (cache-logits, upgrade)
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


class CacheIncompleteError(ValueError):
    """A mentor's build is unfinished or has holes (missing chunk files)."""


class CacheReadError(ValueError):
    """A file of the store is missing, unreadable or fails its checksum/digest."""


def repair_hint(store: CacheRef, file: str | None = None) -> str:
    """What to do about a damaged `file` (as `CacheLocation.file` names it) of the cache at
    `store`."""
    loc = cache_location(store)
    root, name = loc.file(), None if file is None else str(file)
    parts = tuple(name[len(root) + 1:].split("/")) if name and name.startswith(root + "/") \
        else ()
    if len(parts) >= 4 and parts[0] == "mentors" and parts[-1] != "zarr.json":  # a chunk
        return (f"delete {name} and rerun the `ckd cache-logits --out {loc} ...` command "
                "that built the store: it rebuilds missing chunks")
    if len(parts) >= 2 and parts[0] == "mentors":
        return (f"delete {loc.file('mentors/' + parts[1])} and rerun the `ckd cache-logits "
                f"--out {loc} ...` command that built the store: it recomputes that mentor")
    return (f"run `ckd cache verify {loc}` to list every damaged file; if the store's own "
            f"files are damaged, delete {loc} and rebuild it with `ckd cache-logits`")


def read_error(store: CacheRef, file: str, err: BaseException) -> CacheReadError:
    why = f"{type(err).__name__}: {err}".strip()
    return CacheReadError(f"cannot read {file} ({why[:300]}): {repair_hint(store, file)}")


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


def _compressor(codec: str, itemsize: int) -> list[Any]:
    cfg = CODECS[codec]
    if codec.startswith("blosc"):
        return [BloscCodec(typesize=itemsize, shuffle="shuffle", **cfg)]
    if codec.startswith("zstd"):
        return [ZstdCodec(**cfg)]
    return []


def data_codecs(dtype: str) -> dict[str, Any]:
    """Every array other than logits: compressed, then a crc32c of the compressed bytes."""
    return dict(serializer=BytesCodec(endian="little"),
                compressors=[*_compressor(DEFAULT_CODEC, np.dtype(dtype).itemsize),
                             Crc32cCodec()])


def logits_codecs(layout: Layout) -> dict[str, Any]:
    """zarr `create_array` codec kwargs: in-chunk transpose to [samples, slots, classes]
    (views of one sample adjacent), compressor, then a crc32c checksum of the compressed
    bytes (verified on every read)."""
    filters = [TransposeCodec(order=(1, 0, 2))] if layout.slots_per_chunk > 1 else []
    comp = _compressor(layout.codec, np.dtype(layout.dtype).itemsize)
    return dict(filters=filters, serializer=BytesCodec(endian="little"),
                compressors=[*comp, Crc32cCodec()])


# ------------------------------------------------------------------ per-mentor arrays
@dataclass(frozen=True)
class UnitValues:
    """What a work unit computed, handed to every `ArraySpec.compute`."""

    logits: np.ndarray  # [slots, samples, C] in the cache dtype (as stored)
    labels: np.ndarray  # [samples] int64
    outputs: dict[str, Any] = field(default_factory=dict)  # extra model outputs, if any


@dataclass(frozen=True)
class ArraySpec:
    """One per-mentor array [S, N, *suffix(layout)], chunked like `logits` (a unit writes
    chunk (a, b, 0...) of every array) and covered by the unit's completion marker."""

    name: str
    dtype: str | None  # None: the cache's logits dtype
    suffix: Callable[[Layout], tuple[int, ...]]
    dims: tuple[str, ...]  # names of the suffix dimensions
    codec: str  # "logits": the store's codec and view transpose; "data": data_codecs
    compute: Callable[[UnitValues], np.ndarray]
    derived: bool = False  # a function of the stored logits and labels only: verify
    #                        recomputes it exactly, `ckd cache upgrade` computes it

    def dtype_for(self, layout: Layout) -> str:
        return self.dtype or layout.dtype

    def create_kwargs(self, layout: Layout) -> dict[str, Any]:
        dtype = self.dtype_for(layout)
        codecs = logits_codecs(layout) if self.codec == "logits" else data_codecs(dtype)
        return dict(shape=(layout.num_slots, layout.num_samples, *self.suffix(layout)),
                    chunks=(layout.slots_per_chunk, layout.samples_per_chunk,
                            *self.suffix(layout)),
                    dtype=dtype, fill_value=0, dimension_names=("slot", "sample", *self.dims),
                    config={"write_empty_chunks": True}, **codecs)


def _stats(u: UnitValues) -> np.ndarray:
    return stored_row_stats(u.logits, u.labels)


def _num_stats(layout: Layout) -> tuple[int, ...]:
    return (len(STAT_FIELDS),)


MENTOR_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("logits", None, lambda lay: (lay.num_classes,), ("class",), "logits",
              lambda u: u.logits),
    ArraySpec("stats", "float32", _num_stats, ("stat",), "data", _stats, derived=True),
)
# Optional per-mentor feature arrays (`ckd cache-logits --features pool[,map]`): the pooled
# feature the classifier reads, [S, N, D], and the last stage's map, [S, N, C, H, W]; their
# per-row shapes depend on the mentor and are recorded in its attributes ("features").
FEATURES = ("pool", "map")
_FEATURE_DIMS = {"pool": ("feature",), "map": ("channel", "height", "width")}


# Random-resized-crop caches (image folders): each view's (top, left, height, width, flip)
# in the image's original pixels (ckd.data.rrc), held by every mentor whose attributes say
# "boxes": true (the same boxes for all of them; each mentor sees them at its resolution).
BOXES = ArraySpec("boxes", "uint16", lambda lay: (5,), ("box",), "data",
                  lambda u: u.outputs["boxes"])


def root_array_names(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The root data arrays of a cache: labels, and view_ids for keyed discrete views
    (random-resized-crop caches hold their boxes per mentor instead)."""
    views = attrs["views"]
    if attrs.get("kind") == "pose":  # each pose mentor holds its views' parameters
        return ("labels",)
    if views["mode"] == "keyed" and recipe_for(views["recipe"]).num_views is not None:
        return ("labels", "view_ids")
    return ("labels",)


def feature_spec(name: str, shape: Sequence[int]) -> ArraySpec:
    """The ArraySpec of a mentor's feature array `name` with per-row `shape`, in the
    cache's dtype; its values come from the unit's model outputs."""
    if name not in FEATURES:
        raise ValueError(f"unknown feature {name!r}; cacheable features: {', '.join(FEATURES)}")
    shape = tuple(int(d) for d in shape)
    return ArraySpec(name, None, lambda lay: shape, _FEATURE_DIMS[name], "data",
                     lambda u: u.outputs[name])


CORRECT = "train_correct"  # int32 [S, n_blocks]: correct top-1 count of each unit's slots
MARKER = "unit_crc32c"  # int64 [n_slot_chunks, n_blocks, arrays + 1]: crc32c of each array's
#                        values in the unit (declared arrays, then CORRECT); -1 = not done


def marker_arrays_kwargs(layout: Layout, num_arrays: int) -> dict[str, dict[str, Any]]:
    """create_array kwargs of the two per-unit arrays (not [S, N, ...] shaped); the marker
    holds one crc32c per declared array of the mentor (`num_arrays`) and one of CORRECT."""
    na, nb = layout.grid
    return {
        CORRECT: dict(shape=(layout.num_slots, nb), chunks=(layout.slots_per_chunk, 1),
                      dtype="int32", fill_value=-1, dimension_names=("slot", "block"),
                      config={"write_empty_chunks": True}, **data_codecs("int32")),
        MARKER: dict(shape=(na, nb, num_arrays + 1), chunks=(1, 1, num_arrays + 1),
                     dtype="int64", fill_value=-1,
                     dimension_names=("slot_chunk", "block", "array"),
                     config={"write_empty_chunks": True}, **data_codecs("int64")),
    }


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


def read_root_attrs(path: CacheRef) -> dict[str, Any]:
    """Root attributes of a cache, with a clear error when `path` is not one."""
    loc = cache_location(path)
    loc.check_reachable()  # name a bad bucket, credentials or endpoint first
    attrs = read_json_attrs(loc, "zarr.json", missing=(
        f"no logit cache at {path}: build one with `ckd cache-logits --out {path} ...`"))
    if attrs.get("format") != FORMAT:
        raise CacheMismatchError(f"{path} is a zarr group but not a {FORMAT} store "
                                 f"(format={attrs.get('format')!r})")
    check_version(attrs, path)
    return attrs


def check_version(attrs: dict[str, Any], path: str | Path) -> None:
    """Refuse a store of another format version, naming the command that converts it."""
    version = attrs.get("version")
    if version == VERSION:
        return
    if isinstance(version, int) and version < VERSION:
        raise CacheMismatchError(
            f"{path} has cache format version {version}, this ckd reads version {VERSION}: "
            f"convert it in place with `ckd cache upgrade {path}` (adds checksums, digests "
            "and mentor statistics; resumable)")
    raise CacheMismatchError(
        f"{path} has cache format version {version!r}, newer than this ckd's {VERSION}: "
        "update ckd, or rebuild the cache with this version into a new --out")


def read_json_attrs(store: CacheRef, key: str, missing: str | None = None) -> dict[str, Any]:
    """The `attributes` of the zarr.json at `key`, reading it as JSON: a missing, truncated
    or invalid file is a CacheReadError naming it (or FileNotFoundError(`missing`))."""
    loc = cache_location(store)
    data = loc.get(key)
    if data is None:
        if missing is not None:
            raise FileNotFoundError(missing)
        raise read_error(loc, loc.file(key), FileNotFoundError("missing"))
    try:
        meta = json.loads(data)
        if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
            raise ValueError("not a Zarr v3 metadata document")
        attrs = meta.get("attributes", {})
        if not isinstance(attrs, dict):
            raise ValueError("attributes is not an object")
        return attrs
    except (ValueError, UnicodeDecodeError) as err:
        raise read_error(loc, loc.file(key), err) from err


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

"""`ckd cache copy SRC DST`: stage a cache store between a local folder and an object store
(either side may be either), every chunk's checksum verified, resumable.

- Every chunk file is checked against its own crc32c (the last codec of every array,
  `layout.data_codecs` / `logits_codecs`) as it is read from SRC: a damaged source chunk
  stops the copy, naming the file, before it reaches DST.
- Files are written whole through zarr's `Store.set` (locally tmp + rename; object
  stores: atomic puts),
  chunks first and metadata last, the root `zarr.json` very last: until the copy has
  finished DST is not a readable cache.
- A rerun skips the files DST already holds with SRC's size (a file is either absent or
  whole), so an interrupted copy resumes; DST records which SRC it is a copy of
  (`.ckd-copy-source`: the sha256 of SRC's root metadata) and refuses to be resumed from
  another one.
- At the end DST is checked as a reader opens it (`check_store`: the digests of the root
  arrays and of each mentor's metadata and unit markers, and every unit's chunk files);
  `ckd cache verify DST` reads every value again if wanted.
The copy holds DST's writer lock (docs/CACHE_FORMAT.md, "One writer per store").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import crc32c
from tqdm import tqdm

from .layout import LOCK_FILE, CacheReadError, read_root_attrs, repair_hint
from .location import CacheLocation, CacheRef, cache_location
from .lock import writer_lock
from .reader import check_store, list_mentors, open_root
from .store import check_out_folder

SOURCE_FILE = ".ckd-copy-source"


@dataclass
class CopyReport:
    files: int = 0  # files in the store
    copied: int = 0  # written by this run (the rest were already there)
    bytes_copied: int = 0


def chunk_crc_ok(data: bytes) -> bool:
    """A chunk file ends with the little-endian crc32c of the bytes before it (zarr's
    Crc32cCodec, the last codec of every cache array)."""
    return len(data) >= 4 and crc32c.crc32c(data[:-4]) == int.from_bytes(data[-4:], "little")


def _crc_arrays(src: CacheLocation, keys: Iterable[str]) -> dict[str, bool]:
    """{array path: its chunks end with a crc32c} for every array of the store (each key
    `<array>/zarr.json` whose node type is array)."""
    out = {}
    for key in keys:
        if key.endswith("/zarr.json"):
            meta = json.loads(src.get(key) or b"{}")
            if meta.get("node_type") == "array":
                codecs = meta.get("codecs") or []
                out[key[:-len("/zarr.json")]] = bool(codecs) and codecs[-1].get("name") \
                    == "crc32c"
    return out


def _array_of(rel: str, arrays: Iterable[str]) -> str | None:
    """The array a chunk key belongs to (`mentors/r8/logits/c/0/1/0` -> `mentors/r8/logits`,
    whatever the array's chunk key encoding); None for metadata and other files."""
    if rel.endswith("zarr.json"):
        return None
    return next((a for a in arrays if rel.startswith(a + "/")), None)


def _write(dst: CacheLocation, rel: str, data: bytes) -> None:
    dst.set(rel, data)  # whole: tmp + rename locally, one atomic put on an object store


def _order(files: dict[str, int]) -> list[str]:
    """Chunks first, then array/group metadata (deepest first), the root zarr.json last."""
    def key(rel: str) -> tuple[int, int, str]:
        meta = rel.endswith("zarr.json")
        return (int(meta) + int(rel == "zarr.json"), -rel.count("/") if meta else 0, rel)

    return sorted(files, key=key)


def _inside(inner: CacheLocation, outer: CacheLocation) -> bool:
    """`inner` lies under `outer` (folders resolved; object store URLs by prefix)."""
    if inner.local is not None and outer.local is not None:
        return inner.local.resolve().is_relative_to(outer.local.resolve())
    if inner.local is not None or outer.local is not None:
        return False
    return inner.url.startswith(outer.url.rstrip("/") + "/")


def copy_cache(src: CacheRef, dst: CacheRef, progress: bool = False) -> CopyReport:
    """Copy the cache store `src` to `dst` (see the module docstring)."""
    src_p, dst_p = cache_location(src), cache_location(dst)
    if str(src_p) == str(dst_p):
        raise ValueError(f"SRC and DST are the same store ({src_p})")
    for outer, inner in ((src_p, dst_p), (dst_p, src_p)):
        if _inside(inner, outer):  # the copy would become part of SRC, or SRC of it
            raise ValueError(f"{inner} is inside {outer}: a cache cannot be copied into "
                             "itself or into a folder it lies in; choose a DST outside SRC")
    read_root_attrs(src_p)  # a cache of this version, else a clear error
    root_meta = src_p.get("zarr.json") or b""
    source_id = hashlib.sha256(root_meta).hexdigest()
    files = {k: v for k, v in src_p.sizes().items()
             if k != LOCK_FILE and k != SOURCE_FILE and not _is_temp(k)}
    if dst_p.local is not None:
        check_out_folder(dst_p)
    with writer_lock(dst_p, f"ckd cache copy {src_p} {dst_p}"):
        have = dst_p.sizes()
        for k in [k for k in have if _is_temp(k)]:  # temp files of a killed local write
            dst_p.delete(k)
        recorded = dst_p.get(SOURCE_FILE)
        if "zarr.json" in have and recorded is None:
            if dst_p.get("zarr.json") != root_meta:
                raise FileExistsError(f"{dst_p} already holds another cache: choose another "
                                      "DST, or delete it first")
        elif recorded is not None and recorded.decode() != source_id:
            raise FileExistsError(f"{dst_p} is a partial copy of another cache (not "
                                  f"{src_p}): delete it, or rerun the copy from its source")
        _write(dst_p, SOURCE_FILE, source_id.encode())
        rep = CopyReport(files=len(files))
        crc_arrays = _crc_arrays(src_p, files)
        todo = [k for k in _order(files) if have.get(k) != files[k] or k == "zarr.json"]
        with tqdm(total=sum(files[k] for k in todo), unit="B", unit_scale=True,
                  desc=f"copy -> {dst_p}", disable=not progress) as bar:
            for rel in todo:
                data = src_p.get(rel)
                if data is None:
                    raise CacheReadError(f"{src_p.file(rel)}: vanished while copying (is "
                                         "another process writing SRC?); rerun the copy")
                if crc_arrays.get(_array_of(rel, crc_arrays)) and not chunk_crc_ok(data):
                    bad = src_p.file(rel)
                    raise CacheReadError(
                        f"{bad}: fails its crc32c (a damaged chunk of the source; "
                        f"nothing of it was copied): {repair_hint(src_p, bad)}; then "
                        "rerun the copy (it resumes)")
                _write(dst_p, rel, data)
                rep.copied += 1
                rep.bytes_copied += len(data)
                bar.update(len(data))
        meta: dict[str, Any] = read_root_attrs(dst_p)
        complete = {m: a for m, a in list_mentors(dst_p).items() if a.get("complete")}
        check_store(dst_p, meta, open_root(dst_p), complete)
        dst_p.delete(SOURCE_FILE)
    return rep


def _is_temp(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp") or name.endswith(".partial")

"""`ckd cache verify` of a pose cache: the generic checks of every cache (markers, chunk
files, checksums, digests, finite rows), the view parameters re-derived from (seed, sample,
slot) and mentors' rows and PCK recomputed from their checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from ckd.cache.info import verify
from ckd.cache.location import cache_location, zarr_store
from ckd.cache.reader import list_mentors
from ckd.models import file_sha256
from ckd.pose.cache import old_pose_store, open_pose_cache, view_table
from ckd.pose.coco import load_pose_prepared
from ckd.pose.mentors import batch_views, load_pose_mentor
from ckd.pose.views import view_params


def verify_pose_cache(path: str | Path, *, recompute: bool = False, data: str | None = None,
                      samples: int = 32) -> list[str]:
    """Problems found (empty: the cache is sound). Always: the generic checks of
    `ckd cache verify` (markers, chunk files, every chunk through its crc32c and its unit
    checksum, digests, finite rows). With `recompute`: every view's parameters re-derived
    from (seed, sample, slot), and with `data` `samples` samples per slot of every mentor's
    rows and PCK recomputed from its checkpoint (equal bit for bit in the store dtype)."""

    p = Path(path)
    if old_pose_store(cache_location(p)) is not None:
        open_pose_cache(p)  # refused with the command that rebuilds it
    problems = list(verify(p).problems)
    if problems or not recompute:
        return problems
    root = zarr.open_group(zarr_store(p, read_only=True), mode="r")
    attrs = root.attrs.asdict()
    seed, n = int(attrs["views"]["seed"]), int(attrs["num_samples"])
    table = view_table(seed, n, int(attrs["views"]["num_slots"])).numpy()
    for alias in attrs["pose"]["mentors"]:
        stored = root[f"mentors/{alias}/view_params"][:]
        if not np.array_equal(table, stored):
            bad = int((table != stored).any(-1).sum())
            problems.append(f"{alias}/view_params: {bad} views differ from the keyed view "
                            "function")
    if data is None or problems:
        return problems
    ds = load_pose_prepared(data)
    cache = open_pose_cache(p, ds)
    found = list_mentors(p)
    for alias in cache.aliases:
        ck = Path(found[alias]["checkpoint"])
        if not ck.is_file() or file_sha256(ck) != found[alias]["checkpoint_sha256"]:
            problems.append(f"mentor {alias}: checkpoint {ck} missing or changed since caching")
    if problems:
        return problems
    mentors = [load_pose_mentor(found[a]["checkpoint"], ds) for a in cache.aliases]
    gen = torch.Generator().manual_seed(0)
    dtype = cache.attrs["dtype"]
    for s in range(cache.slots):
        idx = torch.randperm(n, generator=gen)[:samples].sort().values
        x, kps, w, _ = batch_views(ds, ds.train, idx, view_params(seed, idx, s))
        for mi, mentor in enumerate(mentors):
            rows, key = mentor.rows_and_key(x, kps, w)
            if not np.array_equal(key.numpy(), cache.pck[mi, s, idx.numpy()], equal_nan=True):
                problems.append(f"{cache.aliases[mi]}/pck: slot {s}: recomputed PCK differs")
            held = cache.arrays[mi]
            if "logits" in held:
                want = rows.numpy().astype(dtype)
                if not np.array_equal(held["logits"][s, idx.numpy()], want):
                    problems.append(f"{cache.aliases[mi]}/logits: slot {s}: recomputed rows "
                                    "differ")
    return problems

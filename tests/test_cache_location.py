"""A cache location is a zarr Store: chunk keys come from each array's own chunk key
encoding, and the writer lease needs only the Store API (so it is checked here on a local
folder, without an object store; tests/test_cache_s3.py runs it on S3)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zarr

from ckd.cache.integrity import chunk_key, open_array
from ckd.cache.location import cache_location, zarr_store
from ckd.cache.lock import StoreBusyError, object_lease


@pytest.mark.parametrize("encoding, want", [
    ({"name": "default", "separator": "/"}, "mentors/t/logits/c/1/2/0"),
    ({"name": "default", "separator": "."}, "mentors/t/logits/c.1.2.0"),
    ({"name": "v2", "separator": "."}, "mentors/t/logits/1.2.0"),
])
def test_chunk_keys_follow_the_arrays_encoding(tmp_path, encoding, want):
    loc = cache_location(tmp_path / "store")
    arr = zarr.create_array(zarr_store(loc), name="mentors/t/logits", shape=(4, 6, 3),
                            chunks=(2, 2, 3), dtype="float32", chunk_key_encoding=encoding)
    arr[:] = np.ones(arr.shape, dtype="float32")
    key = chunk_key(open_array(loc, "mentors/t/logits"), (1, 2, 0))
    assert key == want
    assert loc.exists(key) and key in loc.keys("mentors/t")  # the file zarr wrote
    assert loc.file(key) == str(tmp_path / "store" / key)


def test_location_calls_on_a_missing_folder_create_nothing(tmp_path):
    loc = cache_location(f"file://{tmp_path}/none")
    assert loc.get("zarr.json") is None and loc.keys() == [] and loc.children() == []
    assert not loc.exists("zarr.json") and loc.size() == 0
    assert not (tmp_path / "none").exists()


def test_the_lease_needs_only_the_store_api(tmp_path):
    loc = cache_location(tmp_path / "leased")
    with object_lease(loc, "first writer"):
        lease = json.loads(loc.get(".ckd-writer.lock"))
        assert lease["command"] == "first writer"
        with pytest.raises(StoreBusyError, match="first writer"):
            with object_lease(loc, "second writer"):
                pass
    assert not loc.exists(".ckd-writer.lock")  # released
    old = {"host": "other-node", "pid": 1, "command": "gone", "heartbeat": time.time() - 1e4}
    loc.set(".ckd-writer.lock", json.dumps(old).encode())
    with object_lease(loc, "taker"):  # a stale lease is taken over
        assert json.loads(loc.get(".ckd-writer.lock"))["command"] == "taker"

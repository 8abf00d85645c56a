"""Offline logit cache: frozen mentors run once per augmentation view into a Zarr v3 store
(`build_cache`), read back by a row source (`open_cache`: memory, stream or blocks; the
`RowSource` interface, rows.py). Format: docs/CACHE_FORMAT.md."""

from .layout import CacheIncompleteError, CacheMismatchError, CacheReadError
from .reader import list_mentors
from .rows import RowBatch, RowSource
from .sources import open_cache
from .writer import build_cache

__all__ = ["open_cache", "RowSource", "RowBatch", "build_cache", "CacheMismatchError",
           "CacheIncompleteError", "CacheReadError", "list_mentors"]

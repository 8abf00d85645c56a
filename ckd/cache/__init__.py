"""Offline logit cache: frozen mentors run once per augmentation view into a Zarr v3 store
(`build_cache`), read back by `LogitCache` (memory or stream mode). Format:
docs/CACHE_FORMAT.md."""

from .layout import CacheIncompleteError, CacheMismatchError, CacheReadError
from .reader import LogitCache, list_mentors
from .writer import build_cache

__all__ = ["LogitCache", "build_cache", "CacheMismatchError", "CacheIncompleteError",
           "CacheReadError", "list_mentors"]

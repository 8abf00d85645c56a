"""`open_cache`: open a logit cache as the row source a reader asks for (rows.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .blocks import WINDOW, BlockRows
from .memory import MemoryRows
from .reader import CacheReader
from .stream import StreamRows

MODES = ("memory", "stream", "blocks")


def open_cache(path: str | Path, mode: str = "memory", device: str | torch.device = "cpu",
               mentors: Sequence[str] | None = None, features: Sequence[str] = (), *,
               progress: bool = False, window: int = WINDOW) -> CacheReader:
    """The cache at `path` (a folder, `file://` or `s3://` URL) as a row source:
    `memory` (every row of `mentors` loaded now; `progress` shows the load), `stream`
    (each epoch's rows read ahead by a thread) or `blocks` (a window of `window` units:
    dense logits and stats only). All return the same rows for the same request; `device`
    is where `gather` puts them; `features` (`pool`, `map`) are loaded for
    `gather_rows(..., features=...)`. Opening checks the store (docs/CACHE_FORMAT.md)."""
    if mode == "memory":
        return MemoryRows(path, device, mentors, features, progress=progress)
    if mode == "stream":
        return StreamRows(path, device, mentors, features)
    if mode == "blocks":
        return BlockRows(path, device, mentors, features, window=window)
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


__all__ = ["open_cache", "MODES"]

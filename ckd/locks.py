"""One writer per folder: an exclusive `fcntl` lock on a file inside it.

The kernel drops the lock when its process ends, however it ends (exit, exception,
kill -9), so a killed run never leaves a stale lock behind; the pid written into the file
only tells the next process who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".ckd.lock"


class LockedError(RuntimeError):
    """Another live process is writing to the same folder."""


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, what: str, fix: str) -> Iterator[Path]:
    """Hold the lock of `folder` for the block; raise `LockedError` at once (no waiting)
    naming the holder's pid and `fix` when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise LockedError(f"{what} {folder} is in use by another ckd process (pid "
                              f"{holder}): {fix}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock

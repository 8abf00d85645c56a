"""One writer per folder (a run folder, a cache store): an exclusive `fcntl` lock on a
file inside it.

The kernel drops the lock when its process ends, however it ends (exit, exception,
kill -9), so a killed writer never leaves a stale lock behind. While held, the file names
the holder (pid and command) for the error the next writer gets; it is emptied on
release, so a finished folder's bytes do not depend on which process wrote it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_NAME = ".ckd.lock"


class LockedError(RuntimeError):
    """Another live process is writing to the same folder."""


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, *, holder: str,
                   busy: Callable[[str], Exception], file: str = LOCK_NAME) -> Iterator[Path]:
    """Hold `folder`'s lock for the block. When another process holds it, raise
    `busy(who)` at once (no waiting), `who` being what the holder wrote ("pid N: cmd")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 256, 0).decode(errors="replace").strip() or "pid unknown"
            raise busy(who) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {holder}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock

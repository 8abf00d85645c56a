"""One writer per cache store: `cache-logits` and `cache upgrade` hold an exclusive fcntl
lock on `<store>/.ckd-writer.lock` while they write. The kernel drops the lock when the
process ends (even by kill -9), so a stale lock file never blocks; a second writer gets an
error naming the holder's pid."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .layout import LOCK_FILE


class StoreBusyError(RuntimeError):
    """Another process is writing this cache store."""


@contextlib.contextmanager
def writer_lock(store: str | Path, command: str) -> Iterator[None]:
    """Hold the store's writer lock; the file says who holds it (emptied on release, so a
    finished store's bytes do not depend on which process wrote it)."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise StoreBusyError(
            f"{store} is being written by another process ({holder}): one writer per cache "
            "store. Wait for it to finish (or stop it), then rerun this command; it resumes "
            "where the other one stopped") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command}\n".encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

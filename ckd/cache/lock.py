"""One writer per cache store: `cache-logits` and `cache upgrade` hold the store's
exclusive lock (`ckd.locks`, file `<store>/.ckd-writer.lock`) while they write; a second
writer gets an error naming the holder's pid and command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ckd.locks import LockedError, exclusive_lock

from .layout import LOCK_FILE


class StoreBusyError(LockedError):
    """Another process is writing this cache store."""


@contextlib.contextmanager
def writer_lock(store: str | Path, command: str) -> Iterator[None]:
    """Hold the store's writer lock (`ckd.locks.exclusive_lock` on LOCK_FILE)."""
    def busy(who: str) -> StoreBusyError:
        return StoreBusyError(
            f"{store} is being written by another process ({who}): one writer per cache "
            "store. Wait for it to finish (or stop it), then rerun this command; it resumes "
            "where the other one stopped")

    with exclusive_lock(store, holder=command, busy=busy, file=LOCK_FILE):
        yield

"""One writer per cache store: `cache-logits`, `cache upgrade` and `cache copy` hold the
store's exclusive lock while they write; a second writer gets an error naming the holder's
pid and command.

- Local stores: `ckd.locks` (an fcntl lock on `<store>/.ckd-writer.lock`, dropped by the
  kernel however the holder ends).
- Object stores (no fcntl): a lease object `<store>/.ckd-writer.lock` created with a
  conditional put (`If-None-Match: *`, so exactly one writer wins), holding the holder's
  host, pid, command and a heartbeat time refreshed every `ttl / 4` seconds. A lease is
  stale (taken over) when its holder is a dead pid on this host, or its heartbeat is
  older than `ttl` (`CKD_S3_LOCK_TTL_S`, default 120 s). It is deleted on release.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ckd.locks import LockedError, exclusive_lock

from .layout import LOCK_FILE
from .location import ObjectPath, cache_path, explain


class StoreBusyError(LockedError):
    """Another process is writing this cache store."""


def _busy(store: object, who: str) -> StoreBusyError:
    return StoreBusyError(
        f"{store} is being written by another process ({who}): one writer per cache "
        "store. Wait for it to finish (or stop it), then rerun this command; it resumes "
        "where the other one stopped")


@contextlib.contextmanager
def writer_lock(store: str | Path | ObjectPath, command: str) -> Iterator[None]:
    """Hold the store's writer lock (fcntl locally, a lease object on an object store)."""
    where = cache_path(store)
    if isinstance(where, ObjectPath):
        with object_lease(where / LOCK_FILE, command):
            yield
        return
    with exclusive_lock(where, holder=command, busy=lambda who: _busy(store, who),
                        file=LOCK_FILE):
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(lease: dict, ttl: float) -> bool:
    if lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", 0))):
        return True
    return time.time() - float(lease.get("heartbeat", 0)) > ttl


@contextlib.contextmanager
def object_lease(lock: ObjectPath, command: str) -> Iterator[None]:
    """Hold the lease object `lock` for the block (see the module docstring)."""
    import obstore

    ttl = float(os.environ.get("CKD_S3_LOCK_TTL_S", 120))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": command}

    def body() -> bytes:
        return json.dumps({**me, "heartbeat": time.time()}).encode()

    client = lock.client
    for _ in range(2):
        try:
            obstore.put(client, lock.key, body(), mode="create")
            break
        except obstore.exceptions.AlreadyExistsError:
            try:
                lease = json.loads(lock.read_bytes())
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except ValueError:
                lease = {}
            if not _stale(lease, ttl):
                who = f"pid {lease.get('pid')} on {lease.get('host')}: {lease.get('command')}"
                raise _busy(lock.parent, who) from None
            lock.unlink(missing_ok=True)  # a killed holder's lease: take it over
        except Exception as err:  # noqa: BLE001 - bucket, credentials, endpoint
            raise explain(str(lock.parent), err) from err
    else:
        raise _busy(lock.parent, "another writer took it over at the same time")

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl / 4):
            with contextlib.suppress(Exception):  # a missed beat is retried next time
                obstore.put(client, lock.key, body())

    beat = threading.Thread(target=heartbeat, daemon=True, name="ckd-lease-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=5)
        with contextlib.suppress(Exception):
            lock.unlink(missing_ok=True)

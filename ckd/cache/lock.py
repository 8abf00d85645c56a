"""One writer per cache store: `cache-logits`, `cache upgrade` and `cache copy` hold the
store's exclusive lock while they write; a second writer gets an error naming the holder's
pid and command.

- Local stores: `ckd.locks` (an fcntl lock on `<store>/.ckd-writer.lock`, dropped by the
  kernel however the holder ends).
- Object stores (no fcntl): a lease object `<store>/.ckd-writer.lock`, written through
  zarr's `Store.set_if_not_exists` (a conditional put, `If-None-Match: *`, so exactly one
  writer creates it; the writer whose token it then holds won), holding the holder's
  host, pid, command and a heartbeat time refreshed every `ttl / 4` seconds. A lease is
  stale (taken over) when its holder is a dead pid on this host, or its heartbeat is
  older than `ttl` (`CKD_S3_LOCK_TTL_S`, default 120 s). It is deleted on release. The
  lease needs only zarr's `Store` API, so it would serve any store without fcntl.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from ckd.locks import LockedError, exclusive_lock

from .layout import LOCK_FILE
from .location import CacheLocation, CacheRef, cache_location


class StoreBusyError(LockedError):
    """Another process is writing this cache store."""


def _busy(store: object, who: str) -> StoreBusyError:
    return StoreBusyError(
        f"{store} is being written by another process ({who}): one writer per cache "
        "store. Wait for it to finish (or stop it), then rerun this command; it resumes "
        "where the other one stopped")


@contextlib.contextmanager
def writer_lock(store: CacheRef, command: str) -> Iterator[None]:
    """Hold the store's writer lock (fcntl locally, a lease object on an object store)."""
    where = cache_location(store)
    if where.local is None:
        with object_lease(where, command):
            yield
        return
    with exclusive_lock(where.local, holder=command, busy=lambda who: _busy(store, who),
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


def _read_lease(where: CacheLocation) -> dict | None:
    data = where.get(LOCK_FILE)
    if data is None:
        return None
    try:
        lease = json.loads(data)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


@contextlib.contextmanager
def object_lease(where: CacheLocation, command: str) -> Iterator[None]:
    """Hold the lease object `LOCK_FILE` of the store at `where` for the block (see the
    module docstring)."""
    ttl = float(os.environ.get("CKD_S3_LOCK_TTL_S", 120))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
          "token": uuid.uuid4().hex}

    def body() -> bytes:
        return json.dumps({**me, "heartbeat": time.time()}).encode()

    for _ in range(2):
        where.set_if_not_exists(LOCK_FILE, body())
        lease = _read_lease(where)
        if lease is None:
            continue  # released meanwhile: try again
        if lease.get("token") == me["token"]:
            break  # created by this call
        if not _stale(lease, ttl):
            who = f"pid {lease.get('pid')} on {lease.get('host')}: {lease.get('command')}"
            raise _busy(where, who)
        where.delete(LOCK_FILE)  # a killed holder's lease: take it over
    else:
        raise _busy(where, "another writer took it over at the same time")

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl / 4):
            with contextlib.suppress(Exception):  # a missed beat is retried next time
                where.set(LOCK_FILE, body())

    beat = threading.Thread(target=heartbeat, daemon=True, name="ckd-lease-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=5)
        with contextlib.suppress(Exception):
            where.delete(LOCK_FILE)

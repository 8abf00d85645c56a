"""Where a cache store lives: a local folder (a path or `file://` URL) or an object-store
prefix (`s3://bucket/prefix`, read and written through zarr's obstore-backed store).

`cache_location(url)` gives a `CacheLocation`: the zarr `Store` of the location (a
`LocalStore` or an `ObjectStore`), the name users gave it, and its local folder where
there is one. Everything the cache code does to its files beyond zarr's arrays (markers'
chunk files present, copies, the writer lease, sizes) is a call on that `Store`, so one
code path serves both kinds; only the fcntl writer lock, the free-space check and the
cleanup of temp files left by killed writes use the local folder.

Object stores are configured the standard way, from the `AWS_*` environment variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
`AWS_ALLOW_HTTP`, ...) that obstore reads. A client is made per process; obstore's runtime
does not survive fork, so a process forked after its parent used an object store is
refused with the fix (spawn the workers) instead of hanging. Failures are raised as
`ObjectStoreError` naming the URL and the likely fix.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core import sync as zarr_sync
from zarr.core.buffer import default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.core.config import config
from zarr.storage import LocalStore, ObjectStore

_WRITE = object()  # CacheLocation._run: a write (no default for a missing folder)


class ObjectStoreError(OSError):
    """An object store could not be reached or used (names the URL and the fix)."""


def cache_location(path: str | os.PathLike | CacheLocation) -> CacheLocation:
    """A cache location: `s3://bucket/prefix`, `file:///x` or a folder path."""
    if isinstance(path, CacheLocation):
        return path
    text = os.fspath(path)
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{text}: an object-store cache URL is s3://BUCKET/PREFIX")
        key = key.strip("/")
        return CacheLocation(f"s3://{bucket}/{key}" if key else f"s3://{bucket}",
                             bucket=bucket, prefix=key)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ValueError(f"{text}: unsupported cache URL scheme; use a local path, file:// "
                         "or s3://BUCKET/PREFIX")
    return CacheLocation(str(Path(text)), local=Path(text))


def _env_hint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
    return f"endpoint {endpoint}" if endpoint else "AWS's default endpoint (no AWS_ENDPOINT_URL)"


def explain(url: str, err: BaseException) -> ObjectStoreError:
    """An ObjectStoreError naming `url` and the likely fix for an obstore failure."""
    text = str(err)
    first = text.splitlines()[0][:300] if text else type(err).__name__
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    if endpoint.startswith("http://") and os.environ.get("AWS_ALLOW_HTTP", "").lower() \
            not in ("true", "1"):
        why = (f"the endpoint {endpoint} is plain http, which the S3 client refuses unless "
               "AWS_ALLOW_HTTP=true is set: export AWS_ALLOW_HTTP=true (or use an https "
               "endpoint)")
    elif "NoSuchBucket" in text:
        why = (f"the bucket does not exist at {_env_hint()}: create it, or fix the bucket "
               "name / AWS_ENDPOINT_URL")
    elif "/latest/api/token" in text or "credential" in text.lower() or "InvalidAccessKeyId" \
            in text or "SignatureDoesNotMatch" in text or "403" in text:
        why = ("no valid credentials (none in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
               "and no instance metadata service answered): set AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY (and AWS_REGION) for this bucket")
    elif "error sending request" in text or "Connect" in text or "connection" in text.lower():
        why = (f"cannot reach {_env_hint()}: check AWS_ENDPOINT_URL (and AWS_ALLOW_HTTP=true "
               "for a plain-http endpoint) and that the server is up")
    else:
        why = f"object store error at {_env_hint()}"
    return ObjectStoreError(f"{url}: {why} ({type(err).__name__}: {first})")


_CLIENTS: dict[tuple, Any] = {}
_RUNTIME_PID: list[int] = []  # the process whose obstore runtime is live


def _check_not_forked(url: str) -> None:
    """obstore's async runtime does not survive fork: a child forked after its parent used
    an object store hangs on any request, even with a new client. Say so instead."""
    if _RUNTIME_PID and _RUNTIME_PID[0] != os.getpid():
        raise ObjectStoreError(
            f"{url}: this process was forked from one that had already used the object "
            "store, and obstore cannot make requests after a fork: start worker processes "
            "with the 'spawn' (or 'forkserver') method and open the cache in each of them "
            "(torchrun's ranks already are separate processes)")
    if not _RUNTIME_PID:
        _RUNTIME_PID.append(os.getpid())


def _drain_requests(timeout_s: float = 5.0) -> None:
    """At exit, wait (bounded) for the object-store requests in flight on zarr's event loop
    to finish before zarr's own exit hook stops the loop: a request that completes while the
    interpreter finalizes makes obstore's runtime thread take the GIL then, which can abort
    the process ("PyGILState_Release ... finalizing"). Readers should be closed before exit
    (their threads stop issuing requests); this covers the requests they left behind."""
    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed():
        return
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    except RuntimeError:  # the set of tasks changed while it was read
        return
    deadline = time.monotonic() + timeout_s
    while any(not t.done() for t in pending) and time.monotonic() < deadline:
        time.sleep(0.01)


def s3_client(bucket: str, prefix: str = "") -> Any:
    """The obstore S3Store of `bucket` (keys under `prefix`) for this process, configured
    from the AWS_* environment variables (a changed endpoint or credential gets a new
    client). Refused in a process forked after its parent used an object store."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), bucket, prefix, env)
    _check_not_forked(f"s3://{bucket}/{prefix}".rstrip("/"))
    if key not in _CLIENTS:
        if not _CLIENTS:
            atexit.register(_drain_requests)  # runs before zarr's own exit hook (LIFO)
        try:
            from obstore.store import S3Store  # noqa: PLC0415 - optional (s3:// caches only)
        except ImportError as err:
            raise ImportError("s3:// caches need obstore: pip install 'ckd[s3]' (or rerun "
                              "`make setup`)") from err
        # Fail within seconds on an unreachable endpoint instead of obstore's 3 minutes.
        retry = {"max_retries": int(os.environ.get("CKD_S3_MAX_RETRIES", 3)),
                 "retry_timeout": timedelta(seconds=30)}
        try:
            _CLIENTS[key] = S3Store(bucket, prefix=prefix or None, retry_config=retry)
        except Exception as err:  # noqa: BLE001 - obstore config errors
            raise explain(f"s3://{bucket}/{prefix}", err) from err
    return _CLIENTS[key]


@dataclass(frozen=True)
class CacheLocation:
    """Where a cache store lives: the name users gave it (`url`: a folder path or
    `s3://bucket/prefix`) and its local folder (`local`, None on an object store: only the
    fcntl writer lock, the free-space check and the cleanup of killed writes' temp files
    need a filesystem). `zarr_store(location)` is its zarr `Store`, made per process
    (obstore clients do not survive fork).

    The few synchronous calls the cache code makes on the store (`get`, `set`,
    `set_if_not_exists`, `exists`, `keys`, `children`, `folders`, `sizes`, `size`,
    `delete`, `delete_dir`) are that `Store`'s own API run on zarr's event loop, the same
    for a `LocalStore` and an obstore-backed `ObjectStore`; object-store failures are
    raised as `ObjectStoreError` naming the URL and the fix."""

    url: str
    local: Path | None = None
    bucket: str = ""
    prefix: str = ""

    def __str__(self) -> str:
        return self.url

    def file(self, key: str = "") -> str:
        """The name users see for `key` (a file path locally, a URL on an object store)."""
        key = key.strip("/")
        if self.local is not None:
            return str(self.local / key) if key else str(self.local)
        return f"{self.url}/{key}" if key else self.url

    # ------------------------------------------------------------ sync calls on the Store
    def _run(self, call: Callable[[Store], Awaitable[Any]], *, read: Any = _WRITE) -> Any:
        """`call(store)` on zarr's event loop. Reads (`read`: what a missing local folder
        gives) use a read-only store, which never creates the folder."""
        if read is not _WRITE and self.local is not None and not self.local.is_dir():
            return read
        store = zarr_store(self, read_only=read is not _WRITE)
        if self.local is not None:
            return zarr_sync.sync(call(store))
        try:
            return zarr_sync.sync(call(store))
        except Exception as err:  # noqa: BLE001 - obstore's errors, named by URL
            raise explain(self.url, err) from err

    def get(self, key: str) -> bytes | None:
        """The bytes stored at `key`, None when there are none."""
        async def get(store: Store) -> bytes | None:
            buf = await store.get(key, default_buffer_prototype())
            return None if buf is None else buf.to_bytes()

        return self._run(get, read=None)

    def set(self, key: str, data: bytes) -> None:
        """Write `key` whole (an atomic rename locally, an atomic put on an object store)."""
        self._run(lambda store: store.set(key, _buffer(data)))

    def set_if_not_exists(self, key: str, data: bytes) -> None:
        """Create `key` unless it exists (an exclusive link locally, a conditional put on an
        object store: of two writers exactly one creates it)."""
        self._run(lambda store: store.set_if_not_exists(key, _buffer(data)))

    def exists(self, key: str) -> bool:
        return bool(self._run(lambda store: store.exists(key), read=False))

    def delete(self, key: str) -> None:
        """Delete `key` (nothing when absent)."""
        self._run(lambda store: store.delete(key))

    def delete_dir(self, prefix: str) -> None:
        """Delete every key under `prefix` (a folder locally)."""
        self._run(lambda store: store.delete_dir(prefix.strip("/")))

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (one listing on an object store), relative to the root."""
        under = f"{prefix.strip('/')}/".lstrip("/")

        async def collect(store: Store) -> list[str]:
            return [k async for k in store.list_prefix(under)]

        return self._run(collect, read=[])

    def children(self, prefix: str = "") -> list[str]:
        """The names directly under `prefix` (its files and folders), sorted."""
        under = f"{prefix.strip('/')}/".lstrip("/")

        async def collect(store: Store) -> list[str]:
            return sorted({k.strip("/") async for k in store.list_dir(under)})

        return self._run(collect, read=[])

    def folders(self, prefix: str = "") -> list[str]:
        """The names of the folders (key prefixes) directly under `prefix`, sorted."""
        base = prefix.strip("/")
        return [c for c in self.children(base) if not self.exists(f"{base}/{c}".lstrip("/"))]

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{key relative to `prefix`: size} of every key under `prefix`."""
        keys = self.keys(prefix)
        cut = len(f"{prefix.strip('/')}/".lstrip("/"))

        async def sizes(store: Store) -> list[int]:
            return await concurrent_map([(k,) for k in keys], store.getsize,
                                        limit=config.get("async.concurrency"))

        return {k[cut:]: int(n) for k, n in zip(keys, self._run(sizes, read=[]), strict=True)}

    def size(self, prefix: str = "") -> int:
        """Bytes stored under `prefix` (zarr's `getsize_prefix`)."""
        under = f"{prefix.strip('/')}/".lstrip("/")
        return int(self._run(lambda store: store.getsize_prefix(under), read=0))

    def check_reachable(self) -> None:
        """One cheap request on an object store: raise ObjectStoreError naming the URL if
        the bucket cannot be listed (wrong bucket, no credentials, unreachable endpoint)."""
        if self.local is not None:
            return

        async def first(store: Store) -> None:
            async for _ in store.list_prefix(""):
                break

        self._run(first, read=None)


CacheRef = str | os.PathLike | CacheLocation  # what a cache location may be given as


def _buffer(data: bytes) -> Any:
    return default_buffer_prototype().buffer.from_bytes(data)


def zarr_store(where: str | os.PathLike | CacheLocation, read_only: bool = False) -> Store:
    """The zarr store of a cache location (LocalStore, or ObjectStore over obstore)."""
    loc = cache_location(where)
    if loc.local is None:
        return ObjectStore(s3_client(loc.bucket, loc.prefix), read_only=read_only)
    return LocalStore(loc.local, read_only=read_only)

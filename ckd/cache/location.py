"""Where a cache store lives: a local folder (a path or `file://` URL) or an object-store
prefix (`s3://bucket/prefix`, read and written through zarr's obstore-backed store).

`cache_path(url)` gives a `pathlib.Path` for local stores and an `ObjectPath` for object
stores; `ObjectPath` implements the few `Path` operations the cache code uses (`/`,
`exists`, `is_file`, `is_dir`, `iterdir`, `rglob`, `read_bytes`, `write_bytes`, `unlink`,
`stat().st_size`), so one code path serves both. `zarr_store(path)` opens the matching zarr
store.

Object stores are configured the standard way, from the `AWS_*` environment variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
`AWS_ALLOW_HTTP`, ...) that obstore reads. A client is made per process; obstore's runtime
does not survive fork, so a process forked after its parent used an object store is
refused with the fix (spawn the workers) instead of hanging. Failures are raised as
`ObjectStoreError` naming the URL and the likely fix.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMES = ("s3://",)


class ObjectStoreError(OSError):
    """An object store could not be reached or used (names the URL and the fix)."""


def is_object_url(path: Any) -> bool:
    return isinstance(path, ObjectPath) or (isinstance(path, str) and path.startswith(SCHEMES))


def cache_path(path: str | os.PathLike | ObjectPath) -> Path | ObjectPath:
    """A cache location: `s3://bucket/prefix` -> ObjectPath, `file:///x` or a path -> Path."""
    if isinstance(path, ObjectPath):
        return path
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{text}: an object-store cache URL is s3://BUCKET/PREFIX")
        return ObjectPath(bucket, key.strip("/"))
    if "://" in text:
        raise ValueError(f"{text}: unsupported cache URL scheme; use a local path, file:// "
                         "or s3://BUCKET/PREFIX")
    return Path(text)


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


def s3_client(bucket: str, prefix: str = "") -> Any:
    """The obstore S3Store of `bucket` (keys under `prefix`) for this process, configured
    from the AWS_* environment variables (a changed endpoint or credential gets a new
    client). Refused in a process forked after its parent used an object store."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), bucket, prefix, env)
    _check_not_forked(f"s3://{bucket}/{prefix}".rstrip("/"))
    if key not in _CLIENTS:
        try:
            from obstore.store import S3Store
        except ImportError as err:
            raise ImportError("s3:// caches need obstore: pip install 'ckd[s3]' (or rerun "
                              "`make setup`)") from err
        from datetime import timedelta

        # Fail within seconds on an unreachable endpoint instead of obstore's 3 minutes.
        retry = {"max_retries": int(os.environ.get("CKD_S3_MAX_RETRIES", 3)),
                 "retry_timeout": timedelta(seconds=30)}
        try:
            _CLIENTS[key] = S3Store(bucket, prefix=prefix or None, retry_config=retry)
        except Exception as err:  # noqa: BLE001 - obstore config errors
            raise explain(f"s3://{bucket}/{prefix}", err) from err
    return _CLIENTS[key]


@dataclass(frozen=True)
class _Stat:
    st_size: int


class ObjectPath:
    """`s3://bucket/key`: the `pathlib.Path` subset the cache code uses, on an object store.
    Folders are key prefixes (an object store has no empty folders)."""

    def __init__(self, bucket: str, key: str = "") -> None:
        self.bucket, self.key = bucket, key.strip("/")

    # ----------------------------------------------------------- naming
    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self.bucket, self.key) == (other.bucket,
                                                                               other.key)

    def __hash__(self) -> int:
        return hash((self.bucket, self.key))

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, part: str) -> ObjectPath:
        return self.joinpath(part)

    def joinpath(self, *parts: str) -> ObjectPath:
        key = "/".join(p for p in (self.key, *(str(x).strip("/") for x in parts)) if p)
        return ObjectPath(self.bucket, key)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.key.split("/") if p)

    def is_relative_to(self, other: Any) -> bool:
        return isinstance(other, ObjectPath) and other.bucket == self.bucket and (
            not other.key or self.key == other.key or self.key.startswith(other.key + "/"))

    def relative_to(self, other: Any) -> Path:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not in {other}")
        return Path(self.key[len(other.key):].lstrip("/") or ".")

    # ----------------------------------------------------------- IO
    @property
    def client(self) -> Any:
        return s3_client(self.bucket)

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as err:  # noqa: BLE001 - obstore's errors, named by URL
            if isinstance(err, FileNotFoundError) and "NoSuchBucket" not in str(err):
                raise FileNotFoundError(f"{self}: no such object") from err
            raise explain(str(self), err) from err

    def _head(self) -> dict[str, Any] | None:
        import obstore

        try:
            return self._call(obstore.head, self.client, self.key)
        except FileNotFoundError:
            return None

    def _keys(self, recursive: bool = True) -> Iterator[tuple[str, int]]:
        """(key relative to this prefix, size) of every object under it."""
        import obstore

        prefix = self.key + "/" if self.key else ""
        if recursive:
            stream = self._call(obstore.list, self.client, prefix or None, chunk_size=1000)
            try:
                for batch in stream:
                    for meta in batch:
                        yield meta["path"][len(prefix):], int(meta["size"])
            except Exception as err:  # noqa: BLE001 - errors surface while iterating
                raise explain(str(self), err) from err
        else:
            res = self._call(obstore.list_with_delimiter, self.client, prefix or None)
            for p in res["common_prefixes"]:
                yield p.rstrip("/")[len(prefix):] + "/", 0
            for meta in res["objects"]:
                yield meta["path"][len(prefix):], int(meta["size"])

    def check_bucket(self) -> None:
        """One cheap request: raise ObjectStoreError naming the URL if the bucket cannot be
        listed (wrong bucket, no credentials, unreachable endpoint)."""
        import obstore

        try:
            next(iter(obstore.list(self.client, self.key or None, chunk_size=1)), None)
        except Exception as err:  # noqa: BLE001
            raise explain(str(self), err) from err

    def is_file(self) -> bool:
        return bool(self.key) and self._head() is not None

    def is_dir(self) -> bool:
        return next(self._keys(recursive=False), None) is not None

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator[ObjectPath]:
        for rel, _ in self._keys(recursive=False):
            yield self / rel.rstrip("/")

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        for rel, _ in self._keys():
            if fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern):
                yield self / rel

    def files(self) -> dict[str, int]:
        """{key relative to this prefix: size} of every object under it (one listing)."""
        return dict(self._keys())

    def read_bytes(self) -> bytes:
        import obstore

        return bytes(self._call(obstore.get, self.client, self.key).bytes())

    def write_bytes(self, data: bytes) -> int:
        import obstore

        self._call(obstore.put, self.client, self.key, data)
        return len(data)

    def unlink(self, missing_ok: bool = False) -> None:
        import obstore

        if not missing_ok and self._head() is None:
            raise FileNotFoundError(str(self))
        self._call(obstore.delete, self.client, self.key)

    def stat(self) -> _Stat:
        head = self._head()
        if head is None:
            raise FileNotFoundError(str(self))
        return _Stat(int(head["size"]))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to create (prefixes exist once an object is under them)."""


def zarr_store(path: Path | ObjectPath | str, read_only: bool = False) -> Any:
    """The zarr store of a cache location (LocalStore, or ObjectStore over obstore)."""
    path = cache_path(path)
    if isinstance(path, ObjectPath):
        from zarr.storage import ObjectStore

        return ObjectStore(s3_client(path.bucket, path.key), read_only=read_only)
    from zarr.storage import LocalStore

    return LocalStore(path, read_only=read_only)


def list_files(path: Path | ObjectPath) -> dict[str, int]:
    """{relative posix path: size} of every file under a store (one listing on S3)."""
    if isinstance(path, ObjectPath):
        return path.files()
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            f = Path(root) / n
            out[f.relative_to(path).as_posix()] = f.stat().st_size
    return out


def remove_tree(path: Path | ObjectPath) -> None:
    """Delete a folder (local) or every object under a prefix (object store)."""
    if isinstance(path, ObjectPath):
        for rel in list(path.files()):
            (path / rel).unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

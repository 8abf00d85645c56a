"""The one atomic file write of the package: a reader (or a kill -9 mid-write) sees the old
file or the new one, never a partial one, and a failed write leaves no temp file behind.

The temp file lives in the destination folder (same filesystem, so `os.replace` is an
atomic rename), is fsynced before the rename, and is named `.<name>.<random>.tmp`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds it is renamed onto `path`
    (for writers that want a file name, e.g. ffcv), else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """`open(path, mode)` whose content appears at `path` only once the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)`, atomically."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


_CONVERT_HINT = ("To convert it, only if you trust the file: `obj = torch.load(path, "
                 "weights_only=False)`, take the model (or obj['model']) and re-save its "
                 "weights with `torch.save({'model': model.state_dict()}, 'converted.pth')`.")


def safe_torch_load(path: str | os.PathLike, *, map_location: Any = "cpu",
                    error: type[Exception] = ValueError, what: str = "PyTorch checkpoint",
                    convert_hint: str = _CONVERT_HINT) -> Any:
    """`torch.load(weights_only=True)`: tensors, containers and plain values only, so a
    crafted file cannot run code while it is read. Refusals and unreadable files raise
    `error` naming the file, what it holds and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        # "Unsupported operand" = bytes that are no pickle at all, not a refused object.
        if "weights only" not in msg.lower() or "Unsupported operand" in msg:
            raise error(f"{path} is not a readable {what} "
                        "(not a torch.save file, or truncated)") from err
        bad = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        obj = f"the object {bad.group(1)}" if bad else "Python objects"
        raise error(
            f"{path} holds {obj}, which torch.load(weights_only=True) refuses to unpickle "
            "(unpickling arbitrary objects could run code hidden in the file; e.g. a whole "
            f"pickled model or a custom class). {convert_hint}") from err
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated/corrupt zip, random bytes, ...
        raise error(f"{path} is not a readable {what} "
                    f"({type(err).__name__}: {err})") from err


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Swap the complete folder `new` in for `dest` by two renames (`dest` ->
    `<dest>.replaced`, `new` -> `dest`), then delete the old one. After a kill at any
    point, `finish_replace_dir(new, dest)` completes the swap."""
    new, dest = Path(new), Path(dest)
    old = dest.with_name(dest.name + ".replaced")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def finish_replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Complete a `replace_dir(new, dest)` that a kill interrupted (no-op otherwise)."""
    new, dest = Path(new), Path(dest)
    old = dest.with_name(dest.name + ".replaced")
    if not dest.exists() and new.exists():
        os.replace(new, dest)  # killed between the two renames: `new` was complete
    shutil.rmtree(old, ignore_errors=True)

"""FFCV `.beton` files for a prepared dataset: `train.beton`, `test.beton` (fields image
= raw uint8 [32, 32, 3] NDArrayField, label, index) and `meta.json`.

FFCV facts this relies on (measured by the team, ffcv 1.0.2): the loader's `drop_last`
defaults to True (we always pass False), it reuses a few output buffers (we copy), and
`num_workers` above the core count raises (we use min(2, cpu_count)).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ckd.atomic import atomic_path, atomic_write_text

from .datasets import Dataset, Split

META = "meta.json"
SPLITS = ("train", "test")


def ffcv_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class BetonRows:
    """Indexable rows for ffcv's DatasetWriter: `row(i)` is sample i's tuple of fields."""

    def __init__(self, n: int, row: Callable[[int], tuple]) -> None:
        self.n, self.row = n, row

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        return self.row(i)


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """ffcv sets torch's intra-op thread count as a side effect (to 1 when imported, to its
    worker count when a Loader is made or iterated), overriding OMP_NUM_THREADS and
    torch.set_num_threads: restore the caller's count after it. (Two threads where the
    caller asked for one were 10-25x slower per step on a loaded 2-core machine.)"""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def import_ffcv() -> None:
    """Import ffcv (once) without its first import's side effect on torch's thread count;
    call before any `from ffcv... import` so that import finds ffcv already loaded."""
    with keep_torch_threads():
        import ffcv  # noqa: F401, PLC0415 - heavy import


def ffcv_epoch(loader) -> Iterator:
    """One epoch of an ffcv Loader, keeping torch's thread count (ffcv sets it to its worker
    count when an epoch starts, in the caller's thread and in its epoch thread) and stopping
    ffcv's prefetch thread when the epoch is left early."""
    threads = torch.get_num_threads()
    it = iter(loader)
    try:
        for out in it:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            yield out
    finally:
        it.close()


def write_beton(split: Split, path: str | Path) -> Path:
    """Write one split as a .beton (atomic: written beside, then renamed)."""
    import_ffcv()
    from ffcv.fields import IntField, NDArrayField  # noqa: PLC0415 - heavy import
    from ffcv.writer import DatasetWriter  # noqa: PLC0415 - optional heavy dependency (ffcv)

    path = Path(path)
    fields = {
        "image": NDArrayField(dtype=np.dtype("uint8"), shape=tuple(split.images.shape[1:])),
        "label": IntField(),
        "index": IntField(),
    }
    with atomic_path(path) as tmp, keep_torch_threads():
        writer = DatasetWriter(str(tmp), fields, num_workers=ffcv_workers())
        writer.from_indexed_dataset(BetonRows(len(split), lambda i: (
            split.images[i], int(split.labels[i]), int(i))), chunksize=1000)
    return path


def write_betons(dataset: Dataset, out_dir: str | Path) -> Path:
    """Write `train.beton`, `test.beton` and `meta.json` into `out_dir`; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        write_beton(getattr(dataset, name), out / f"{name}.beton")
    meta = dict(name=dataset.name, num_classes=int(dataset.num_classes),
                fingerprint=dataset.fingerprint, n_train=len(dataset.train),
                n_test=len(dataset.test), mean=list(dataset.mean), std=list(dataset.std),
                image_shape=list(dataset.train.images.shape[1:]), extra=dataset.extra)
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    return out


def read_beton(path: str | Path, *, batch_size: int = 2048) -> Split:
    """Read a whole .beton back into a Split (sequential, exact; placed by the index field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .beton; create it with `ckd prepare`")
    with keep_torch_threads():
        from ffcv.loader import Loader, OrderOption  # noqa: PLC0415 - optional heavy dependency (ffcv)

        loader = Loader(str(path), batch_size=batch_size, num_workers=ffcv_workers(),
                        order=OrderOption.SEQUENTIAL, drop_last=False, os_cache=True)
        n = loader.reader.num_samples
        shape = tuple(int(s) for s in loader.reader.handlers["image"].shape)
        images = np.empty((n,) + shape, dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        seen = np.zeros(n, dtype=bool)
        for img, lab, idx in loader:
            idx = np.asarray(idx).reshape(-1)
            images[idx] = np.asarray(img)  # copies out of ffcv's reused buffers
            labels[idx] = np.asarray(lab).reshape(-1)
            seen[idx] = True
    if not seen.all():
        raise ValueError(f"{path}: index field does not cover 0..{n - 1}; re-run ckd prepare")
    return Split(images, labels)


def read_meta(prepared_dir: str | Path) -> dict:
    meta_path = Path(prepared_dir) / META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} missing: {prepared_dir} is not a prepared dataset; run "
            f"`ckd prepare DATASET --out {prepared_dir}`")
    return json.loads(meta_path.read_text())


def load_prepared(prepared_dir: str | Path) -> Dataset:
    """Read a `ckd prepare` directory back into a Dataset, checking its fingerprint."""
    d = Path(prepared_dir)
    meta = read_meta(d)
    train, test = (read_beton(d / f"{name}.beton") for name in SPLITS)
    ds = Dataset(meta["name"], train, test, int(meta["num_classes"]), tuple(meta["mean"]),
                 tuple(meta["std"]), dict(meta.get("extra") or {}))
    if ds.fingerprint != meta["fingerprint"]:
        raise ValueError(
            f"{d}: data fingerprint {ds.fingerprint} != {meta['fingerprint']} in {META}; "
            f"the .beton files were modified or mixed up: re-run `ckd prepare`")
    return ds

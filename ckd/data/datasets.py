"""Datasets as uint8 NHWC arrays: CIFAR-10/100 (official python pickles), scikit-learn's
bundled digits (offline, real data) and a deterministic synthetic set for tests.

Every dataset is a `Dataset` of two `Split`s holding `images` uint8 [N, 32, 32, 3] and
`labels` int64 [N]; its `fingerprint` (sha256 over both splits) is what the cache and the
trainer check so that cached logits are never paired with different images.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ckd.atomic import atomic_open
from ckd.options import OptionError, Param

from .views import CIFAR_VIEWS

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html): folder inside the
# tarball, train files, test files, label key, number of classes.
_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py", tarball="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        label_key=b"labels", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
    ),
    "cifar100": dict(
        folder="cifar-100-python", tarball="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"], test=["test"],
        label_key=b"fine_labels", num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD,
    ),
}


@dataclass
class Split:
    """One split: `images` uint8 [N, 32, 32, 3] (NHWC), `labels` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"Split.images must be uint8 [N, H, W, 3], got {self.images.dtype} "
                f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"Split.labels must be [N={self.images.shape[0]}], got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Dataset:
    """A named dataset with train/test splits and its normalization constants, held in
    memory (a `ckd.data.protocol.TrainingData` with the CIFAR recipe's discrete views)."""

    recipe = CIFAR_VIEWS  # not a field: every in-memory dataset has the CIFAR views

    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: dict = field(default_factory=dict)  # e.g. synthetic's generation parameters

    @cached_property
    def fingerprint(self) -> str:
        """First 16 hex chars of sha256 over shapes, images and labels of both splits."""
        h = hashlib.sha256()
        for split in (self.train, self.test):
            h.update(repr(tuple(split.images.shape)).encode())
            h.update(split.images.tobytes())
            h.update(split.labels.astype("<i8").tobytes())
        return h.hexdigest()[:16]

    @property
    def image_size(self) -> int:
        """Side of the stored (square) images."""
        return int(self.train.images.shape[1])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 NHWC images scaled to [0, 1] (float64, deterministic)."""
    # From per-channel histograms of the 256 uint8 values: exact, no float copy of the data.
    flat = images.reshape(-1, images.shape[-1])
    return histogram_stats(np.stack([np.bincount(flat[:, c], minlength=256)
                                     for c in range(flat.shape[1])]))


def histogram_stats(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] from per-channel 256-bin uint8 histograms [C, 256]."""
    vals = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for counts in hist:
        p = counts / max(1, counts.sum())
        m = float((p * vals).sum())
        mean.append(m)
        std.append(float(np.sqrt((p * (vals - m) ** 2).sum())))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


# --------------------------------------------------------------------------- CIFAR
def _numpy_reconstruct() -> Callable:
    try:
        from numpy._core.multiarray import _reconstruct  # noqa: PLC0415 - numpy >= 2 only
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # noqa: PLC0415 - numpy 1.x
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python archives are pickles of {bytes: list | bytes | ndarray}. Only the
    three numpy globals an ndarray needs may be built, so a crafted archive cannot name a
    callable (os.system, eval, ...) and run code while being read."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                            "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return {"_reconstruct": _numpy_reconstruct(), "ndarray": np.ndarray,
                "dtype": np.dtype}[name]


def _load_cifar_batch(data: bytes, name: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [N, 3072], labels int64 [N]) of one CIFAR batch file, read safely."""
    try:
        entry = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
        arr, labels = entry[b"data"], entry[label_key]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 2 \
                or arr.shape[1] != 3072:
            raise ValueError("b'data' is not a uint8 [N, 3072] array")
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iu" or lab.shape != (len(arr),):
            raise ValueError(f"{label_key!r} is not {len(arr)} integer labels")
    except Exception as err:  # noqa: BLE001 - any malformed or hostile archive
        raise ValueError(
            f"CIFAR batch file {name!r} is not an official CIFAR python batch ({err}); it was "
            "not loaded. Replace the archive with the official one (md5-checked download: "
            "delete it and rerun with network access, or fetch it from "
            "https://www.cs.toronto.edu/~kriz/cifar.html)") from err
    return arr, lab.astype(np.int64)


def _unpickle_batches(read: Callable[[str], bytes], names: list[str], label_key: bytes,
                      ) -> Split:
    images, labels = [], []
    for name in names:
        data, lab = _load_cifar_batch(read(name), name, label_key)
        # Official layout: row-major [N, 3072] = [N, 3 (RGB), 32, 32] -> NHWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return Split(np.concatenate(images), np.concatenate(labels))


def _read_cifar_source(source: Path, spec: dict) -> tuple[Split, Split]:
    """Parse a `cifar-*-python` folder or the official tarball (read in place)."""
    if source.is_dir():
        def read(name: str) -> bytes:
            return (source / name).read_bytes()
        return (_unpickle_batches(read, spec["train"], spec["label_key"]),
                _unpickle_batches(read, spec["test"], spec["label_key"]))
    with tarfile.open(source, "r:gz") as tar:
        def read(name: str) -> bytes:
            member = tar.extractfile(f"{spec['folder']}/{name}")
            if member is None:
                raise ValueError(f"{source}: no {spec['folder']}/{name} inside the tarball")
            return member.read()
        return (_unpickle_batches(read, spec["train"], spec["label_key"]),
                _unpickle_batches(read, spec["test"], spec["label_key"]))


def _find_cifar(data_dir: Path, spec: dict) -> Path | None:
    """data_dir/<folder>, data_dir/<tarball>, or data_dir being the folder/tarball itself."""
    if data_dir.name in (spec["folder"], spec["tarball"]) and data_dir.exists():
        return data_dir
    for cand in (data_dir / spec["folder"], data_dir / spec["tarball"]):
        if cand.exists():
            return cand
    return None


def _download_cifar(name: str, data_dir: Path, spec: dict) -> None:
    """torchvision's downloader when importable, else urllib to the official URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415 - optional, often broken
        cls = tvd.CIFAR100 if name == "cifar100" else tvd.CIFAR10
        cls(str(data_dir), train=True, download=True)
        return
    except Exception:  # noqa: BLE001 - any torchvision failure: fall back to urllib
        pass
    dest = data_dir / spec["tarball"]
    with atomic_open(dest, "wb") as f:  # no partial tarball left behind on failure
        md5 = hashlib.md5()
        try:
            with urllib.request.urlopen(spec["url"], timeout=30) as resp:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    md5.update(chunk)
        except Exception as err:  # noqa: BLE001 - no network, proxy, HTTP error...
            why = f"download failed: {err}"
            raise RuntimeError(_cifar_missing_msg(name, data_dir, spec, why)) from err
        if md5.hexdigest() != spec["md5"]:
            raise RuntimeError(f"{spec['url']}: md5 {md5.hexdigest()} != expected "
                               f"{spec['md5']}; retry")


def _cifar_missing_msg(name: str, data_dir: Path, spec: dict, why: str) -> str:
    return (f"{name}: {why}. Either put the official `{spec['tarball']}` (or its extracted "
            f"`{spec['folder']}/` folder) into --data-dir ({data_dir}), downloaded from "
            f"{spec['url']}, or run on a machine with internet access so it can be "
            f"downloaded there.")


def _load_cifar(name: str, data_dir: Path, download: bool) -> Dataset:
    spec = _CIFAR[name]
    source = _find_cifar(data_dir, spec)
    if source is None:
        if not download:
            raise FileNotFoundError(_cifar_missing_msg(
                name, data_dir, spec, "not found and download=False"))
        _download_cifar(name, data_dir, spec)
        source = _find_cifar(data_dir, spec)
        if source is None:
            raise FileNotFoundError(_cifar_missing_msg(
                name, data_dir, spec, "download left no archive"))
    train, test = _read_cifar_source(source, spec)
    return Dataset(name, train, test, spec["num_classes"], spec["mean"], spec["std"])


# -------------------------------------------------------------------------- digits
def _load_digits(image_size: int) -> Dataset:
    """sklearn's 1797 8x8 digits (0..16) -> uint8 0..255, nearest-neighbour upscale to
    `image_size` (32 by default: each pixel a 4x4 block, exact, no interpolation choices),
    grey -> RGB. `image_size=16` quarters every model's compute (the CPU demo uses it).
    Split: stratified 75/25, `train_test_split(random_state=0)`: 1347 train, 450 test."""
    scale = image_size // 8
    from sklearn.datasets import load_digits  # noqa: PLC0415 - heavy import
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 - optional heavy dependency (scikit-learn)

    d = load_digits()
    grey = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    big = grey.repeat(scale, axis=1).repeat(scale, axis=2)
    rgb = np.repeat(big[..., None], 3, axis=-1)
    labels = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels,
                              random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    train = Split(rgb[tr], labels[tr])
    mean, std = channel_stats(train.images)
    extra = {"image_size": image_size} if image_size != 32 else {}
    return Dataset("digits", train, Split(rgb[te], labels[te]), 10, mean, std, extra)


# ----------------------------------------------------------------------- synthetic
def _load_synthetic(n_train: int, n_test: int, num_classes: int, seed: int) -> Dataset:
    """Class c = a fixed random 4x4x3 colour prototype (upscaled to 32x32 blocks) plus
    Gaussian noise (sd 40 of 255): learnable by a small CNN, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(30, 225, size=(num_classes, 4, 4, 3))
    protos = protos.repeat(8, axis=1).repeat(8, axis=2).astype(np.float32)  # [C,32,32,3]

    def make(n: int) -> Split:
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        x = rng.standard_normal(size=(n, 32, 32, 3), dtype=np.float32)  # float32: 2x faster
        x *= 40.0
        x += protos[labels]
        images = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return Split(images, labels)

    train, test = make(n_train), make(n_test)
    mean, std = channel_stats(train.images)
    extra = dict(n_train=n_train, n_test=n_test, num_classes=num_classes, seed=seed)
    return Dataset("synthetic", train, test, num_classes, mean, std, extra)


DATASETS = ("cifar10", "cifar100", "digits", "synthetic")
# each dataset's options (`-D KEY=VALUE`, `dataset_options:` in a config), declared once
DATASET_OPTIONS: dict[str, tuple[Param, ...]] = {
    "digits": (Param("image_size", 32, int, "side of the upscaled images",
                     choices=(8, 16, 32)),),
    "synthetic": (Param("n_train", 1000, int, "training images", low=1),
                  Param("n_test", 200, int, "test images", low=1),
                  Param("num_classes", 10, int, "classes", low=2),
                  Param("seed", 0, int, "generator seed", low=0)),
}


def dataset_key(name: str) -> str:
    """The canonical name (`CIFAR-100` -> `cifar100`); ValueError listing the valid ones."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise OptionError(f"--dataset {name!r} is invalid: must be one of "
                          f"{', '.join(DATASETS)}")
    return key


def dataset_options(name: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """All options of dataset `name`: declared defaults < `given`, each checked."""
    key = dataset_key(name)
    declared = {p.name: p for p in DATASET_OPTIONS.get(key, ())}
    unknown = sorted(set(given or {}) - set(declared))
    if unknown:
        raise OptionError(f"dataset {key} takes no option(s) {unknown}; its options: "
                          f"{', '.join(declared) or 'none'}")
    values = {**{n: p.default for n, p in declared.items()}, **(given or {})}
    return {n: p.check(values[n], f"dataset {key}: ") for n, p in declared.items()}


def default_data_dir() -> Path:
    """`$CKD_DATA_DIR`, else `./data`: where CIFAR archives are looked for/downloaded."""
    return Path(os.environ.get("CKD_DATA_DIR", "data"))


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = True,
                 **kw) -> Dataset:
    """Load a dataset by name (`cifar10`, `cifar100`, `digits`, `synthetic`).

    `data_dir` is only used by CIFAR (default `$CKD_DATA_DIR` or `./data`); `synthetic`
    takes `n_train`, `n_test`, `num_classes`, `seed`; `digits` takes `image_size`."""
    key = dataset_key(name)
    kw = dataset_options(key, kw)
    if key in _CIFAR:
        return _load_cifar(key, Path(data_dir) if data_dir else default_data_dir(), download)
    if key == "digits":
        return _load_digits(**kw)
    return _load_synthetic(**kw)

"""A prepared image folder (`ckd prepare imagefolder|imagenet`) as training data: the
train/test .betons, their labels and sizes, and the random-resized-crop recipe
(`ckd.data.rrc`) whose K views per image a logit cache holds.

Slot k of image i is `rrc_views(seed, i, k)` in the image's original pixels, decoded by the
replaying FFCV decoder (`ckd.data.images.ImageLoader`) at a model's resolution; the cache
stores every view's box beside the logits (`ckd.cache.image_units` computes them).
`open_prepared(dir)` opens either kind of prepared folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .beton import load_prepared
from .datasets import Dataset
from .images import ImageBeton, ImageLoader
from .rrc import RRC, rrc_views


def prepared_kind(prepared: str | Path) -> str:
    """What `ckd prepare` wrote into `prepared`: "images" (an image folder's JPEG betons)
    or "arrays" (a dataset's uint8 arrays)."""
    meta = Path(prepared) / "meta.json"
    kind = json.loads(meta.read_text()).get("kind") if meta.is_file() else None
    return "images" if kind == "images" else "arrays"


def open_prepared(prepared: str | Path, batch_size: int = 64) -> Dataset | ImageViews:
    """The training data of a `ckd prepare` folder, of either kind (`TrainingData`)."""
    if prepared_kind(prepared) == "images":
        return ImageViews(prepared, batch_size=batch_size)
    return load_prepared(prepared)


class ImageViews:
    """The train/test .betons of a prepared image folder (a `TrainingData`): name,
    fingerprint, num_classes, mean, std, extra, train/test (labels, sizes), the
    random-resized-crop recipe, and loaders of the replayed crops at any resolution."""

    recipe = RRC
    image_size = None  # crops are cut at each model's resolution

    def __init__(self, prepared: str | Path, batch_size: int = 64) -> None:
        self.dir = Path(prepared)
        meta = json.loads((self.dir / "meta.json").read_text())
        if meta.get("kind") != "images":
            raise ValueError(f"{self.dir} is not a prepared image folder: run `ckd prepare "
                             "imagefolder --data-dir DIR --out ...`")
        self.meta = meta
        self.name, self.fingerprint = meta["name"], meta["fingerprint"]
        self.num_classes = int(meta["num_classes"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.extra = dict(meta.get("extra") or {})
        self.train = ImageBeton(self.dir / "train.beton")
        self.test = ImageBeton(self.dir / "test.beton")
        self.labels = self.train.labels
        self.batch_size = int(batch_size)
        self._loaders: dict[tuple[str, int], ImageLoader] = {}

    def loader(self, split: str, size: int) -> ImageLoader:
        """One ImageLoader per (split, resolution), built once (its decoder compiles)."""
        key = (split, int(size))
        if key not in self._loaders:
            self._loaders[key] = ImageLoader(self.dir / f"{split}.beton", [size],
                                             batch_size=self.batch_size,
                                             center_crop=split == "test")
        return self._loaders[key]

    def boxes(self, seed: int, slot: int, indices: torch.Tensor) -> torch.Tensor:
        """View `slot` of training images `indices`: int64 [B, 5] in original pixels."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        hw = torch.from_numpy(self.train.orig_hw[idx.numpy()])
        return rrc_views(seed, idx, slot, hw[:, 0], hw[:, 1])

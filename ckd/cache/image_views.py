"""A prepared image folder as the data of a keyed logit cache: K random-resized-crop views
per image (`ckd.data.rrc`), each mentor fed the same box at its own resolution.

`cache-logits --prepared DIR --views K` on a folder written by `ckd prepare imagefolder`
uses `ImageViews` instead of an in-memory Dataset: slot k of image i is
`rrc_views(seed, i, k)` (original pixels), decoded by the replaying FFCV decoder
(`ckd.data.images.ImageLoader`) at the mentor's resolution. The box and flip of every
cached view are stored beside the logits (array `boxes`, uint16 [K, N, 5] = top, left,
height, width, flip in original pixels) and each mentor's resolution in its attributes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

BOX_FIELDS = ("top", "left", "height", "width", "flip")


def is_image_folder(prepared: str | Path | None) -> bool:
    """Whether `prepared` was written by `ckd prepare imagefolder|imagenet`."""
    meta = Path(prepared or "") / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("kind") == "images"


class ImageViews:
    """The train/test .betons of a prepared image folder, with cache-logits' interface:
    name, fingerprint, num_classes, mean, std, extra, len(train), len(test)."""

    recipe_name = "rrc"

    def __init__(self, prepared: str | Path, batch_size: int = 64) -> None:
        from ckd.data.images import ImageBeton
        from ckd.data.rrc import RECIPE

        self.dir = Path(prepared)
        meta = json.loads((self.dir / "meta.json").read_text())
        if meta.get("kind") != "images":
            raise ValueError(f"{self.dir} is not a prepared image folder: run `ckd prepare "
                             "imagefolder --data-dir DIR --out ...`")
        self.meta, self.recipe = meta, dict(RECIPE)
        self.name, self.fingerprint = meta["name"], meta["fingerprint"]
        self.num_classes = int(meta["num_classes"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.extra = dict(meta.get("extra") or {})
        self.train = ImageBeton(self.dir / "train.beton")
        self.test = ImageBeton(self.dir / "test.beton")
        self.labels = self.train.labels
        self.batch_size = int(batch_size)
        self._loaders: dict[tuple[str, int], Any] = {}

    def loader(self, split: str, size: int) -> Any:
        """One ImageLoader per (split, resolution), built once (its decoder compiles)."""
        from ckd.data.images import ImageLoader

        key = (split, int(size))
        if key not in self._loaders:
            self._loaders[key] = ImageLoader(self.dir / f"{split}.beton", [size],
                                             batch_size=self.batch_size,
                                             center_crop=split == "test")
        return self._loaders[key]

    def boxes(self, seed: int, slot: int, indices: torch.Tensor) -> torch.Tensor:
        """View `slot` of training images `indices`: int64 [B, 5] in original pixels."""
        from ckd.data.rrc import rrc_views

        idx = torch.as_tensor(indices, dtype=torch.int64)
        hw = torch.from_numpy(self.train.orig_hw[idx.numpy()])
        return rrc_views(seed, idx, slot, hw[:, 0], hw[:, 1])

    @torch.no_grad()
    def unit_logits(self, model: torch.nn.Module, size: int, seed: int, slots: range,
                    samples: range, device: torch.device, progress: Any = None,
                    precision: str = "fp32") -> tuple[Any, np.ndarray]:
        """Float32 logits [slots * samples, C] (`HostRows`: copies in flight until its
        `wait()`) and uint16 boxes [slots, samples, 5] of one work unit. Batches are cut
        from the samples in order: fixed composition."""
        from ckd.data.views import normalize

        from .mentors import mentor_forward
        from .pipeline import HostRows

        loader = self.loader("train", size)
        idx = torch.arange(samples.start, samples.stop)
        out = HostRows((len(slots) * len(idx), self.num_classes), device)
        boxes = np.empty((len(slots), len(idx), 5), dtype=np.uint16)
        for j, k in enumerate(slots):
            views = self.boxes(seed, k, idx)
            boxes[j] = views.numpy()
            loader.set_boxes(idx, views)
            pos = j * len(idx)
            for (imgs,), _, got in loader.iterate(idx.numpy()):
                x = normalize(imgs.to(device), self.mean, self.std).permute(0, 3, 1, 2)
                out.put(pos, mentor_forward(model, x, precision))
                pos += len(got)
                if progress is not None:
                    progress.update(len(got))
        return out.ready(), boxes

    @torch.no_grad()
    def test_accuracy(self, model: torch.nn.Module, size: int, device: torch.device,
                      precision: str = "fp32") -> float:
        """Top-1 % on the center crops (224/256 of the short side) of the test images."""
        from ckd.data.views import normalize

        from .mentors import mentor_forward

        loader = self.loader("test", size)
        correct = 0
        for (imgs,), labels, _ in loader.iterate(np.arange(len(self.test))):
            x = normalize(imgs.to(device), self.mean, self.std).permute(0, 3, 1, 2)
            pred = mentor_forward(model, x, precision).argmax(-1).cpu()
            correct += int((pred == labels).sum())
        return round(100.0 * correct / max(1, len(self.test)), 4)


def storage_estimate(num_samples: int, num_views: int, num_classes: int, dtype: str) -> str:
    """What one mentor's logits take uncompressed, e.g. '25.6 GB (...)'."""
    itemsize = 2 if dtype in ("fp16", "float16") else 4
    raw = num_samples * num_views * num_classes * itemsize
    boxes = num_samples * num_views * 5 * 2
    return (f"{raw / 1e9:.2f} GB of logits per mentor before compression ({num_views} views x "
            f"{num_samples} images x {num_classes} classes x {itemsize} B) + "
            f"{boxes / 1e6:.1f} MB of boxes")


def recompute_rows(path: Path, attrs: dict[str, Any], lay: Any, root: Any,
                   mentors: Mapping[str, dict[str, Any]], n_rows: int, views: ImageViews,
                   device: str, seed: int, rep: Any) -> None:
    """`ckd cache verify --recompute N` on an image cache: re-derive the boxes of N random
    (slot, image) rows from `rrc_views` and recompute their logits from the checkpoints."""
    from ckd.data.views import normalize
    from ckd.models import file_sha256

    from .info import compare_rows, stored_rows
    from .layout import check_compatible
    from .mentors import load_recorded_mentor, mentor_forward, recorded_precision

    check_compatible(attrs, fingerprint=views.fingerprint, num_classes=views.num_classes,
                     recipe=views.recipe, path=str(path))
    gen = np.random.default_rng(seed)
    slots = gen.integers(0, lay.num_slots, n_rows)
    idx = gen.integers(0, lay.num_samples, n_rows)
    cache_seed = int(attrs["views"]["seed"])
    expected = np.empty((n_rows, 5), np.int64)
    for k in np.unique(slots):
        rows = np.nonzero(slots == k)[0]
        expected[rows] = views.boxes(cache_seed, int(k), torch.from_numpy(idx[rows])).numpy()
    dev = torch.device(device)
    for alias, m in mentors.items():
        stored = np.asarray(root[f"mentors/{alias}/boxes"].vindex[
            slots[:, None], idx[:, None], np.arange(5)[None]]).astype(np.int64)
        bad = int((stored != expected).any(axis=1).sum())
        if bad:
            rep.problems.append(f"{alias}: {bad}/{n_rows} stored boxes differ from the views "
                                "re-derived from the seed")
        ckpt = Path(m["checkpoint"])
        if not ckpt.is_file() or file_sha256(ckpt) != m["checkpoint_sha256"]:
            rep.problems.append(f"{alias}: checkpoint {ckpt} missing or changed since caching")
            continue
        model = load_recorded_mentor(alias, m, lay.num_classes, dev, (views.mean, views.std))
        loader = views.loader("train", int(m["resolution"]))
        ref = torch.empty((n_rows, lay.num_classes))
        with torch.no_grad():
            for k in np.unique(slots):
                rows = np.nonzero(slots == k)[0]
                loader.set_boxes(torch.from_numpy(idx[rows]), torch.from_numpy(expected[rows]))
                for (imgs,), _, batch_idx in loader.iterate(np.unique(idx[rows])):
                    x = normalize(imgs.to(dev), views.mean, views.std).permute(0, 3, 1, 2)
                    out = mentor_forward(model, x, recorded_precision(m)).float().cpu()
                    for j, i in enumerate(batch_idx.tolist()):
                        ref[rows[idx[rows] == i]] = out[j]
        raw = torch.from_numpy(stored_rows(root[f"mentors/{alias}/logits"], slots, idx))
        compare_rows(rep, path, alias, "logits", ref, raw, lay.dtype, recorded_precision(m))

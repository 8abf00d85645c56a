"""`ckd eval`: top-1 / top-5 accuracy and mean cross-entropy of one checkpoint on a split.

An image folder (`ckd prepare imagefolder|imagenet`) is evaluated with the standard
center crop (224/256 of the short side, resized to the resolution): the resolution is
`--resolution`, else the model's own config (timm's pretrained_cfg, torchvision's 224),
else the zoo arch's input size. Input is normalised as the model expects (its own
statistics when its config has them, else the data's). CIFAR-style data is evaluated on
its un-augmented test images. The checkpoint is anything a mentor can be: a ckd or
RepDistiller checkpoint, a `ckd train` run folder, or timm:MODEL:FILE,
torchvision:ARCH:FILE, module.path:Class:FILE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ckd.cache.mentors import check_resolution, load_mentor, mentor_arch, mentor_input
from ckd.cache.mentors import resolve_mentors as resolve
from ckd.data.images import ImageLoader
from ckd.data.views import IDENTITY_VIEW
from ckd.models.forward import mentor_forward
from ckd.train.setup import open_data

# --split name -> the .beton `ckd prepare` wrote it to (the val/ folder is test.beton)
IMAGE_SPLITS = {"val": "test", "test": "test", "train": "train"}


def _image_batches(ds: Any, split: str, size: int, batch_size: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Center crops of an image folder's split at `size` px, normalised with the data's
    statistics (the model re-normalises to its own: `load_mentor(norm=...)`)."""
    beton = IMAGE_SPLITS[split]
    loader = ImageLoader(ds.dir / f"{beton}.beton", [size], batch_size=batch_size,
                         center_crop=True)
    n = len(ds.train if beton == "train" else ds.test)
    for (imgs,), labels, _ in loader.iterate(np.arange(n)):
        ids = torch.zeros(len(imgs), dtype=torch.int64)  # the crops are the views
        yield ds.recipe.student_input(imgs.to(device), ids, ds.mean, ds.std), labels.to(device)


def _memory_batches(ds: Any, split: str, batch_size: int,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The un-augmented images of a split (the identity view) as the student reads them."""
    data = ds.train if split == "train" else ds.test
    for s in range(0, len(data.labels), batch_size):
        imgs = torch.from_numpy(data.images[s:s + batch_size]).to(device)
        ids = torch.full((len(imgs),), IDENTITY_VIEW, dtype=torch.int64, device=device)
        yield (ds.recipe.student_input(imgs, ids, ds.mean, ds.std),
               torch.from_numpy(data.labels[s:s + batch_size]).to(device))


def check_split(split: str, where: str, image_folder: bool) -> str:
    """The split name, or one line naming the ones the data holds."""
    names = ("val", "train") if image_folder else ("test", "train")
    ok = IMAGE_SPLITS if image_folder else {"test": "test", "val": "test", "train": "train"}
    if split not in ok:
        raise ValueError(f"--split {split!r} is not in {where}: it holds "
                         f"{' and '.join(names)} (`ckd prepare` writes the val/ folder as its "
                         "test split): pass --split val or --split train")
    return split


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str, *, prepared: str | None = None,
                        dataset: str | None = None, data_dir: str | None = None,
                        split: str = "val", resolution: int | None = None,
                        batch_size: int = 64, device: str = "cpu",
                        precision: str = "fp32") -> dict[str, Any]:
    """{'checkpoint', 'arch', 'data', 'split', 'resolution', 'images', 'top1', 'top5',
    'loss'} of one checkpoint (accuracies in %)."""
    ds = open_data(prepared=prepared, dataset=dataset, data_dir=data_dir)
    image_folder = ds.recipe.num_views is None  # crops cut at the model's resolution
    check_split(split, prepared or dataset or "the data", image_folder)
    path = resolve([f"model={checkpoint}"], ds.name)["model"]
    arch = mentor_arch("model", path)
    dev = torch.device(device)
    model = load_mentor("model", path, int(ds.num_classes), dev, norm=(ds.mean, ds.std))
    if image_folder:
        size = mentor_input("model", arch, None, resolution)["resolution"]
        check_resolution(model, "model", arch, size, dev)
        batches = _image_batches(ds, split, size, batch_size, dev)
    else:
        if resolution is not None:
            raise ValueError("--resolution applies to image folders; CIFAR-style data is "
                             "evaluated at its stored size: drop --resolution")
        size = int(ds.train.images.shape[1])
        batches = _memory_batches(ds, split, batch_size, dev)
    k = min(5, int(ds.num_classes))
    n = top1 = topk = 0
    loss = 0.0
    for x, labels in batches:
        logits = mentor_forward(model, x, precision).float()
        top = logits.topk(k, dim=1).indices
        top1 += int((top[:, 0] == labels).sum())
        topk += int((top == labels[:, None]).any(dim=1).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
    return {"checkpoint": str(checkpoint), "arch": arch, "data": ds.name, "split": split,
            "resolution": size, "images": n, "top1": round(100.0 * top1 / max(n, 1), 4),
            f"top{k}" if k != 5 else "top5": round(100.0 * topk / max(n, 1), 4),
            "loss": round(loss / max(n, 1), 6)}


def append_jsonl(path: str | Path, record: dict[str, Any]) -> Path:
    """Append one JSON line (the file is created with its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return path

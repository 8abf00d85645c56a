"""The cache's side of a prepared image folder (`ckd.data.image_views.ImageViews`): each
mentor's logits of K random-resized-crop views per image, the boxes stored beside them
(uint16 [K, N, 5] = top, left, height, width, flip in original pixels), each mentor at its
own resolution (recorded in its attributes), and its center-crop test accuracy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from tqdm import tqdm

from ckd.data.image_views import ImageViews
from ckd.data.views import normalize
from ckd.models.forward import mentor_forward
from ckd.models.registry import arch_spec

from .pipeline import HostRows

BOX_FIELDS = ("top", "left", "height", "width", "flip")


def mentor_resolution(arch: str, override: Mapping[str, int] | None, alias: str) -> int:
    """The resolution a mentor sees: `--resolution alias=S` if given, else its arch's."""
    if override and alias in override:
        return int(override[alias])
    return int(arch_spec(arch).input_size)


@torch.no_grad()
def image_unit_logits(views: ImageViews, model: torch.nn.Module, size: int, seed: int,
                      slots: range, samples: range, device: torch.device,
                      progress: tqdm | None = None, precision: str = "fp32",
                      ) -> tuple[HostRows, np.ndarray]:
    """Float32 logits [slots * samples, C] (`HostRows`: copies in flight until its
    `wait()`) and uint16 boxes [slots, samples, 5] of one work unit. Batches are cut
    from the samples in order: fixed composition."""
    loader = views.loader("train", size)
    idx = torch.arange(samples.start, samples.stop)
    out = HostRows((len(slots) * len(idx), views.num_classes), device)
    boxes = np.empty((len(slots), len(idx), 5), dtype=np.uint16)
    for j, k in enumerate(slots):
        box = views.boxes(seed, k, idx)
        boxes[j] = box.numpy()
        loader.set_boxes(idx, box)
        pos = j * len(idx)
        for (imgs,), _, got in loader.iterate(idx.numpy()):
            x = normalize(imgs.to(device), views.mean, views.std).permute(0, 3, 1, 2)
            out.put(pos, mentor_forward(model, x, precision))
            pos += len(got)
            if progress is not None:
                progress.update(len(got))
    return out.ready(), boxes


@torch.no_grad()
def image_test_accuracy(views: ImageViews, model: torch.nn.Module, size: int,
                        device: torch.device, precision: str = "fp32") -> float:
    """Top-1 % on the center crops (224/256 of the short side) of the test images."""
    loader = views.loader("test", size)
    correct = 0
    for (imgs,), labels, _ in loader.iterate(np.arange(len(views.test))):
        x = normalize(imgs.to(device), views.mean, views.std).permute(0, 3, 1, 2)
        pred = mentor_forward(model, x, precision).argmax(-1).cpu()
        correct += int((pred == labels).sum())
    return round(100.0 * correct / max(1, len(views.test)), 4)


def storage_estimate(num_samples: int, num_views: int, num_classes: int, dtype: str) -> str:
    """What one mentor's logits take uncompressed, e.g. '25.6 GB (...)'."""
    itemsize = 2 if dtype in ("fp16", "float16") else 4
    raw = num_samples * num_views * num_classes * itemsize
    boxes = num_samples * num_views * 5 * 2
    return (f"{raw / 1e9:.2f} GB of logits per mentor before compression ({num_views} views x "
            f"{num_samples} images x {num_classes} classes x {itemsize} B) + "
            f"{boxes / 1e6:.1f} MB of boxes")

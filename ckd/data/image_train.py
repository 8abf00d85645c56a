"""Training on a prepared image folder (`ckd prepare imagefolder`) from its logit cache:
the student sees exactly the random-resized crop its cached mentors saw, at its own
resolution.

Epoch `e` of a run seeded `s` replays slot `epoch_slots(s, e, i)` of image `i`
(the cache's `epoch_views`, the one source of truth), whose box is `rrc_views(cache seed,
i, slot)` in the image's original pixels (the function `cache-logits` drew it from, and
`cache verify --recompute` checks); `ImageLoader`'s replay decoder crops that box from
the stored JPEG and resizes it to the student's resolution. The test split is the usual
center crop. Batches are (uint8 [B, S, S, 3], labels, indices), as the other loaders';
the recipe's `student_input` normalizes them (`ckd.data.rrc.RandomResizedCrops`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from .image_views import ImageViews
from .images import ImageLoader
from .loaders import Loader

SlotsOf = Callable[[int, torch.Tensor], torch.Tensor]  # (epoch, indices) -> slot per sample
BoxesOf = Callable[[int, torch.Tensor], torch.Tensor]  # (slot, indices) -> boxes [B, 5]


class ImageFolderLoader(Loader):
    """`Loader` order and sharding over an image .beton; train batches replay the cached
    views (`slots_of(epoch, indices)` -> slot per sample, `boxes_of(slot, indices)` ->
    boxes), test batches are center crops."""

    def __init__(self, views: ImageViews, split: str, size: int, *,
                 slots_of: SlotsOf | None = None, boxes_of: BoxesOf | None = None,
                 **kw: Any) -> None:
        beton = views.train if split == "train" else views.test
        super().__init__(len(beton), **kw)
        self.size, self.split = int(size), split
        self.slots_of, self.boxes_of = slots_of, boxes_of
        if split == "train" and (slots_of is None or boxes_of is None):
            raise ValueError("training on an image folder replays the cached views: open "
                             "its logit cache (--cache)")
        self._images = ImageLoader(views.dir / f"{split}.beton", [self.size],
                                   batch_size=self.batch_size, center_crop=split != "train")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.order()
        if self.split == "train":
            slots = self.slots_of(self.epoch, order)
            boxes = torch.empty((len(order), 5), dtype=torch.int64)
            for k in torch.unique(slots).tolist():
                at = slots == k
                boxes[at] = self.boxes_of(int(k), order[at])
            self._images.set_boxes(order, boxes)
        nb = self.device.type == "cuda"
        for (imgs,), labels, idx in self._images.iterate(order.numpy()):
            yield (imgs.to(self.device, non_blocking=nb), labels.to(self.device),
                   idx.to(self.device))

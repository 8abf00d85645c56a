"""What every kind of training data offers the cache, the trainer and the AID commands: one
`TrainingData` protocol, with its `ViewRecipe` owning the rule that picks each sample's view.

Two kinds implement it: the in-memory datasets (`ckd.data.datasets.Dataset`: whole uint8
arrays, the CIFAR recipe's 162 discrete views) and prepared image folders
(`ckd.data.image_views.ImageViews`: JPEG .betons, random-resized crops replayed from a
K-view cache). Callers ask the protocol (`ds.recipe.num_views`, `ds.image_size`,
`ds.recipe.epoch_slots`, ...) instead of testing which kind they hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .rrc import RRC
from .views import CIFAR_VIEWS


class ViewRecipe(Protocol):
    """How a training sample becomes the view a model sees: a pure function of (seed,
    epoch or cache slot, sample index), so cached training equals online training."""

    record: Mapping[str, Any]  # {"name", "version"}: what a cache stores and checks
    num_views: int | None  # distinct views; None: continuous (cached as K slots per sample)

    def epoch_view_ids(self, seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        """The view of each sample in `epoch` when every view is available (online, or a
        cache of all views): int64 like `indices`."""
        ...

    def epoch_slots(self, seed: int, epoch: int, indices: torch.Tensor,
                    num_slots: int) -> torch.Tensor:
        """Which of a K-slot cache's slots each sample replays in `epoch` (int64)."""
        ...

    def student_input(self, images: torch.Tensor, view_ids: torch.Tensor,
                      mean: Sequence[float], std: Sequence[float], *,
                      channels_last: bool = False) -> torch.Tensor:
        """A batch as the student reads it: uint8 NHWC + view ids -> float32 NCHW."""
        ...


class LabeledSplit(Protocol):
    """One split: its labels (int64 [N], index = sample index) and its size."""

    labels: np.ndarray

    def __len__(self) -> int: ...


class TrainingData(Protocol):
    """A dataset as the cache and the trainer see it: name, fingerprint, class count,
    normalization, sizes and labels of both splits, and its view recipe."""

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: dict[str, Any]  # parameters recorded beside the cache (e.g. synthetic's)
    train: LabeledSplit
    test: LabeledSplit
    recipe: ViewRecipe

    @property
    def fingerprint(self) -> str:
        """Hex digest of the images and labels (what a cache records and checks)."""
        ...

    @property
    def image_size(self) -> int | None:
        """Side of the stored images; None: views are cut at each model's resolution."""
        ...


RECIPES: dict[str, ViewRecipe] = {r.record["name"]: r for r in (CIFAR_VIEWS, RRC)}


def recipe_for(record: Mapping[str, Any]) -> ViewRecipe:
    """The recipe a cache's `views.recipe` record names (its version is checked against
    the data's by `check_compatible`)."""
    name = record.get("name")
    if name not in RECIPES:
        raise ValueError(f"view recipe {dict(record)} is not one this ckd knows "
                         f"({', '.join(RECIPES)}): rebuild the cache with `ckd cache-logits`")
    return RECIPES[name]

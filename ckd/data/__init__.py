"""Datasets, .beton preparation, loaders (ffcv / memory), keyed augmentation views, and the
`TrainingData` / `ViewRecipe` protocol both kinds of training data implement."""

from .beton import load_prepared, write_betons
from .datasets import DATASETS, Dataset, Split, load_dataset
from .loaders import make_loader
from .protocol import TrainingData, ViewRecipe, recipe_for
from .views import (
    IDENTITY_VIEW,
    NUM_VIEWS,
    RECIPE,
    apply_views,
    decode_views,
    view_ids,
)

__all__ = [
    "DATASETS", "Dataset", "Split", "load_dataset", "IDENTITY_VIEW", "NUM_VIEWS", "RECIPE",
    "apply_views", "decode_views", "view_ids", "write_betons", "load_prepared", "make_loader",
    "TrainingData", "ViewRecipe", "recipe_for",
]

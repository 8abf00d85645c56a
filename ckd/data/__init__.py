"""Datasets, .beton preparation, loaders (ffcv / memory) and keyed augmentation views."""

from .datasets import DATASETS, Dataset, Split, load_dataset
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
]


def __getattr__(name: str):
    # ffcv (numba, cv2) is slow to import: load beton/loaders only when asked for.
    if name in ("write_betons", "load_prepared"):
        from . import beton

        return getattr(beton, name)
    if name == "make_loader":
        from .loaders import make_loader

        return make_loader
    raise AttributeError(name)

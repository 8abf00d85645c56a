"""Mentor features in the cache (`ckd cache-logits --features pool[,map]`): which arrays
each mentor gets, their shapes from its architecture, and the size they will take."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .layout import FEATURES

HUGE_BYTES = 10 << 30  # above this per mentor, say so and suggest fewer views


def parse_features(features: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"pool,map"` or `["pool"]` -> ("pool", "map"), in FEATURES order; unknown names are
    refused with the valid ones."""
    if not features:
        return ()
    names = features.split(",") if isinstance(features, str) else list(features)
    names = [n.strip() for n in names if n.strip()]
    bad = [n for n in names if n not in FEATURES]
    if bad:
        raise ValueError(f"--features {','.join(names)}: unknown {bad}; cacheable features: "
                         f"{', '.join(FEATURES)} (pool: the pooled feature the classifier "
                         "reads; map: the last stage's feature map)")
    return tuple(f for f in FEATURES if f in names)


def mentor_feature_shapes(arch: str, image_size: int, names: Sequence[str]
                          ) -> dict[str, list[int]]:
    """Per-row shape of each requested feature of an architecture ("pool": [D],
    "map": [C, H, W]), from its `is_feat` outputs on the meta device."""
    from ckd.models import feature_shapes

    shapes = feature_shapes(arch, image_size)
    pick = {"pool": shapes[-1], "map": shapes[-2]}
    return {n: list(pick[n]) for n in names}


def feature_bytes(shapes: Mapping[str, Sequence[int]], num_slots: int, num_samples: int,
                  dtype: str) -> int:
    item = np.dtype(dtype).itemsize
    return sum(int(np.prod(s)) * num_slots * num_samples * item for s in shapes.values())


def plan_features(names: Sequence[str], paths: Mapping[str, Path], dataset: Any,
                  num_slots: int, dtype: str, say: Any = print
                  ) -> dict[str, dict[str, list[int]]]:
    """{alias: {feature: shape}} for every mentor; prints the size each mentor's features
    will take (and a warning with a `--views K` suggestion when that is huge)."""
    if not names:
        return {}
    from .mentors import mentor_arch

    image_size = int(dataset.train.images.shape[1])
    n = len(dataset.train)
    out = {}
    for alias, path in paths.items():
        arch = mentor_arch(alias, path)
        shapes = mentor_feature_shapes(arch, image_size, names)
        size = feature_bytes(shapes, num_slots, n, dtype)
        desc = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
        say(f"[cache-logits] {alias} ({arch}) features {desc}: {size / 1e9:.2f} GB for "
            f"{num_slots} views x {n} samples ({dtype})")
        if size > HUGE_BYTES:
            per_view = size / num_slots
            k = max(1, int(HUGE_BYTES // max(per_view, 1)))
            say(f"[cache-logits] warning: {alias}'s features take {size / 1e9:.0f} GB; "
                f"cache fewer views (e.g. --views {k}: {k * per_view / 1e9:.1f} GB) or only "
                "--features pool")
        out[alias] = shapes
    return out

"""Mentor features in the cache (`ckd cache-logits --features pool[,map]`): which arrays
each mentor gets, their shapes from the mentor itself, and the size they will take."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckd.data.datasets import Dataset

from .layout import FEATURES, CacheMismatchError
from .mentors import load_mentor, mentor_arch

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


def mentor_feature_shapes(model: torch.nn.Module, image_size: int, names: Sequence[str]
                          ) -> dict[str, list[int]]:
    """Per-row shape of each requested feature of a loaded mentor ("pool": [D],
    "map": [C, H, W]): its own `is_feat` outputs on two blank images, so a mentor built
    with constructor kwargs (a `ckd train --student-kwargs` run) gets its real widths."""
    param = next(model.parameters(), None)
    x = torch.zeros(2, 3, image_size, image_size,
                    device=param.device if param is not None else "cpu")
    with torch.no_grad():
        stages, _ = model.eval()(x, is_feat=True)
    pick = {"pool": stages[-1], "map": stages[-2]}
    return {n: [int(d) for d in pick[n].shape[1:]] for n in names}


def feature_bytes(shapes: Mapping[str, Sequence[int]], num_slots: int, num_samples: int,
                  dtype: str) -> int:
    item = np.dtype(dtype).itemsize
    return sum(int(np.prod(s)) * num_slots * num_samples * item for s in shapes.values())


def plan_features(names: Sequence[str], paths: Mapping[str, Path], dataset: Dataset,
                  num_slots: int, dtype: str, say: Callable[[str], object] = print
                  ) -> dict[str, dict[str, list[int]]]:
    """{alias: {feature: shape}} for every mentor; prints the size each mentor's features
    will take (and a warning with a `--views K` suggestion when that is huge)."""
    if not names:
        return {}

    image_size = int(dataset.train.images.shape[1])
    n = len(dataset.train)
    out = {}
    for alias, path in paths.items():
        arch = mentor_arch(alias, path)
        model = load_mentor(alias, path, int(dataset.num_classes), torch.device("cpu"))
        shapes = mentor_feature_shapes(model, image_size, names)
        del model
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


def cached_feature_shapes(mentor_meta: Mapping[str, Mapping[str, Any]],
                          features: Sequence[str], path: object, image_folder: bool
                          ) -> dict[str, list[tuple[int, ...]]]:
    """Per-row shape of each requested feature, per mentor (in `mentor_meta`'s order), as
    the store recorded it; a mentor cached without one is refused with the command that adds
    it (an image folder's cache cannot hold features yet)."""
    if not features:
        return {}
    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise ValueError(f"unknown features {bad}; cacheable: {', '.join(FEATURES)}")
    shapes: dict[str, list[tuple[int, ...]]] = {f: [] for f in features}
    for m, attrs in mentor_meta.items():
        have = attrs.get("features") or {}
        lack = [f for f in features if f not in have]
        if lack and image_folder:  # `cache-logits --features` refuses image folders
            raise CacheMismatchError(
                f"this method reads mentor features ({','.join(lack)}), which a cache of "
                f"an image folder ({path}) cannot hold yet: train with a logit "
                "method here (`ckd methods` lists them)")
        if lack:
            raise CacheMismatchError(
                f"mentor {m!r} in {path} was cached without the {','.join(lack)} "
                f"feature(s) this method reads: add them with `ckd cache-logits --out "
                f"{path} --mentors {m}=CHECKPOINT --features "
                f"{','.join(features)} ...` (the same options as the cache was built "
                "with; only the missing features are computed)")
        for f in features:
            shapes[f].append(tuple(int(d) for d in have[f]))
    return shapes

"""`CacheConfig`: how `build_cache` (`ckd cache-logits`) computes and stores the mentors'
logits, every field declared once (`ckd.options.option`): the command's options are
generated from these declarations (`ckd.cli.params`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckd.models.forward import DEFAULT_PRECISION, PRECISIONS
from ckd.options import OptionError, check_device, check_fields, default_device, option

from .layout import CODECS, DEFAULT_CODEC, DTYPES


@dataclass
class CacheConfig:
    views: str = option(
        "all", str, "'all' (every distinct view of the recipe: 162 for CIFAR) or K keyed "
        "views per sample", metavar="all|K")
    seed: int = option(0, int, "augmentation seed (--views K)", low=0)
    batch_size: int | None = option(
        None, int, "images per mentor forward pass", low=1, optional=True,
        details="Default: 512 on CPU; on CUDA the most that fits in half the device's "
        "memory, up to 2048; printed at the start.")
    device: str | None = option(None, str, "cpu | cuda | cuda:N",
                                details="Default: cuda if available.")
    dtype: str = option("fp16", str, "storage precision of the logits",
                        choices=tuple(DTYPES))
    precision: str = option(
        DEFAULT_PRECISION, str, "mentor forward precision (autocast)",
        choices=tuple(PRECISIONS), details="Recorded per mentor: online training and "
        "`cache verify --recompute` run the mentors at it. fp32 is exact.")
    codec: str = option(DEFAULT_CODEC, str, "compression (new stores only)",
                        choices=tuple(CODECS))
    samples_per_chunk: int | None = option(
        None, int, "chunk height (new stores only)", low=1, optional=True,
        details="Default: ~8 MiB raw chunks.")
    overwrite: bool = option(False, bool, "recompute mentors whose checkpoint changed; "
                             "rebuild a store made for other data")
    features: str | None = option(
        None, str, "also store each mentor's pooled feature (pool) and/or last stage map "
        "(map) per cached view, for feature methods (crd, fitnet, sdkd, ...)",
        metavar="pool[,map]", details="Added to an existing cache, only what is missing is "
        "computed.")
    resolutions: dict[str, int] = option(
        {}, dict, "image folders: the input size of a mentor", flags=("--resolution",),
        metavar="ALIAS=PIXELS", details="Default: its arch's, 224 for the ImageNet zoo. "
        "Repeatable.")
    logits: str = option(
        "dense", str, "storage per mentor: dense | topk:K | sample:S for all, or per alias, "
        "e.g. r110=dense,r8=sample:16 (docs/SPARSE.md)")
    deterministic: bool = option(
        False, bool, "strict deterministic algorithms (cuDNN, cuBLAS)",
        details="An op without a deterministic kernel is refused by name instead of warned "
        "about; recorded per mentor, a resume must match (docs/ARCHITECTURE.md).")
    progress: bool = option(True, bool, "progress bars", flags=("--progress/--quiet",))
    writers: int | None = option(
        None, int, "writer threads", low=0, optional=True, details="Default: a few "
        "(ckd.cache.pipeline); 0: each unit is written before the next is computed.")

    def validate(self) -> CacheConfig:
        """Every field against its declaration (values a program passes in other shapes,
        e.g. views=3, features=["pool"], logits={alias: mode}, are first written as the
        command line would give them); returns self."""
        if isinstance(self.views, int) and not isinstance(self.views, bool):
            self.views = str(self.views)
        if isinstance(self.features, (list, tuple)):
            self.features = ",".join(self.features)
        if self.resolutions is None:
            self.resolutions = {}
        if isinstance(self.logits, Mapping):
            self.logits = ",".join(f"{a}={m}" for a, m in self.logits.items())
        check_fields(self)
        for alias, px in self.resolutions.items():
            if isinstance(px, bool) or not isinstance(px, int) or px < 1:
                raise OptionError(f"--resolution {alias}={px!r} is invalid: expected "
                                  "ALIAS=PIXELS (e.g. r50=224)")
        check_device(self.device)
        return self

    @property
    def resolved_device(self) -> str:
        return self.device or default_device()

    def replace(self, **changes: Any) -> CacheConfig:
        """A checked copy with `changes` (build_cache's keywords) applied."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown cache option(s) {unknown}; valid: "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes).validate()

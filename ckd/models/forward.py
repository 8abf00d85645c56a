"""The one mentor forward that the cache build, online training and `ckd cache verify
--recompute` all run (so cached == online holds at each precision), and the mentor features
a feature method reads from a model's `is_feat` outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

# --precision: the autocast dtype of the mentor forward (fp32: none, the exact default)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
DEFAULT_PRECISION = "fp32"  # also what a cache recorded before precisions existed holds


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    return precision


def mentor_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.no_grad()
def mentor_forward(model: torch.nn.Module, x: Tensor, precision: str = "fp32",
                   features: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
    """Input in the model's memory format (`ckd_channels_last`: a CNN kept NHWC on CUDA),
    autocast at `precision`; logits [B, C] (in the autocast dtype), or (stage features,
    logits) with `features`."""
    fmt = torch.channels_last if getattr(model, "ckd_channels_last", False) \
        else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with mentor_autocast(precision, x.device):
        return model(x, is_feat=True) if features else model(x)


def mentor_features(feats: Sequence[Tensor], needs: Sequence[str]) -> dict[str, Tensor]:
    """A model's `is_feat` list -> the named features a cache stores: `pool` (the pooled
    feature, [B, D]) and `map` (the last stage's map, [B, C, H, W])."""
    out = {}
    if "pool" in needs:
        out["pool"] = feats[-1]
    if "map" in needs:
        out["map"] = feats[-2]
    return out

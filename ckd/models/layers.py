"""Layers the zoo's architectures share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C], the mean over the spatial positions. adaptive_avg_pool2d's
    CUDA backward has no deterministic kernel, so under deterministic algorithms
    (`--deterministic`) a CUDA tensor is pooled by avg_pool2d over the whole map: the same
    mean, with a deterministic backward. Everywhere else adaptive_avg_pool2d, as before."""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return torch.flatten(F.avg_pool2d(x, tuple(x.shape[-2:])), 1)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

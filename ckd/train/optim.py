"""The student's optimizer: SGD with momentum (the CNN recipe) or AdamW (ViT / Mamba
students, which SGD at CNN learning rates leaves near chance on small data)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def param_groups(model: torch.nn.Module, weight_decay: float,
                 decay_norm_bias: bool = True) -> list[dict]:
    """The parameters with their weight decay: all of them alike, or (`decay_norm_bias`
    off, the ImageNet recipe) none on biases and normalisation weights (every parameter
    with fewer than two dimensions)."""
    params = list(model.parameters())
    if decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter] | list[dict], lr: float, *,
                   momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer must be sgd or adamw, got {name!r}")

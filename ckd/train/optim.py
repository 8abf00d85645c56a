"""The student's optimizer: SGD with momentum (the CNN recipe) or AdamW (ViT / Mamba
students, which SGD at CNN learning rates leaves near chance on small data)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, *,
                   momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer must be sgd or adamw, got {name!r}")

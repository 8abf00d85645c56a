"""Learning-rate schedules as pure functions of the epoch (so resume needs no state).

- `step`: x`gamma` at the milestones (paper: 150, 180, 210 of 240 epochs).
- `classroom-warmup`: the authors' released recipe: linear from lr (0.05) to
  `warmup_end_lr` (0.01) over 120 warm-up epochs, then x`gamma` at 150, 180, 210.
- `constant`.
- `cosine`: linear from lr / (warm-up + 1) to lr over `warmup_epochs` (default 0), then
  cosine from lr to 0 over the remaining epochs (the ImageNet recipe).
Unset milestones / warm-up length are the paper's, scaled to `epochs` (exact at 240).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_EPOCHS = 240
PAPER_MILESTONES = (150, 180, 210)
PAPER_WARMUP = 120


def scale_epochs(values: tuple[int, ...] | list[int], epochs: int) -> list[int]:
    return [max(1, round(v * epochs / PAPER_EPOCHS)) for v in values]


@dataclass(frozen=True)
class Schedule:
    name: str
    base_lr: float
    milestones: tuple[int, ...] = PAPER_MILESTONES
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_end_lr: float = 0.01
    epochs: int = PAPER_EPOCHS  # cosine: the length it decays over

    def lr_at(self, epoch: int) -> float:
        """Learning rate for (0-based) `epoch`."""
        if self.name == "constant":
            return self.base_lr
        if self.name == "cosine":
            if epoch < self.warmup_epochs:
                return self.base_lr * (epoch + 1) / (self.warmup_epochs + 1)
            span = max(1, self.epochs - self.warmup_epochs)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup_epochs)
                                                        / span))
        decays = sum(epoch >= m for m in self.milestones)
        if self.name == "step":
            return self.base_lr * self.gamma ** decays
        if self.name == "classroom-warmup":
            if epoch < self.warmup_epochs:
                frac = epoch / self.warmup_epochs
                return self.base_lr + (self.warmup_end_lr - self.base_lr) * frac
            return self.warmup_end_lr * self.gamma ** decays
        raise ValueError(f"unknown schedule {self.name!r}; choose step, classroom-warmup, "
                         "constant or cosine")

    def state_dict(self) -> dict:
        return {"name": self.name, "base_lr": self.base_lr, "milestones": list(self.milestones),
                "gamma": self.gamma, "warmup_epochs": self.warmup_epochs,
                "warmup_end_lr": self.warmup_end_lr, "epochs": self.epochs}


def make_schedule(name: str, *, base_lr: float, epochs: int,
                  milestones: list[int] | None = None, gamma: float = 0.1,
                  warmup_epochs: int | None = None, warmup_end_lr: float = 0.01) -> Schedule:
    ms = tuple(milestones) if milestones is not None else tuple(
        scale_epochs(PAPER_MILESTONES, epochs))
    if list(ms) != sorted(ms):
        raise ValueError(f"--milestones must be increasing, got {list(ms)}")
    wu = warmup_epochs if warmup_epochs is not None else scale_epochs((PAPER_WARMUP,),
                                                                      epochs)[0]
    if name == "classroom-warmup" and wu < 1:
        raise ValueError("--warmup-epochs must be >= 1 for the classroom-warmup schedule")
    if name == "cosine":
        wu = warmup_epochs or 0
    sched = Schedule(name, float(base_lr), ms, float(gamma),
                     wu if name in ("classroom-warmup", "cosine") else 0,
                     float(warmup_end_lr), int(epochs))
    sched.lr_at(0)  # validates the name
    return sched

"""Atomic training checkpoints (write a temp file in the same folder, fsync, os.replace) with
every RNG state, so `--resume` continues to the same final weights as an uninterrupted run."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` so that a reader (or a kill -9) never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_training_state(run_dir: str | Path, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, schedule: dict, epoch: int,
                        step: int, best_acc: float, last_acc: float,
                        config: dict) -> Path:
    """`epoch` is the number of finished epochs (the epoch a resume starts at)."""
    path = Path(run_dir) / CHECKPOINT
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule, "epoch": epoch, "step": step, "best_acc": best_acc,
                 "last_acc": last_acc, "rng": rng_state(), "config": config}, path)
    return path


def load_training_state(run_dir: str | Path, device: torch.device) -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=False)

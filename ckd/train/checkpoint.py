"""Atomic training checkpoints (`ckd.atomic.atomic_save`) with every RNG state, so `--resume`
continues to the same final weights as an uninterrupted run. Read back with
`torch.load(weights_only=True)` (`ckd.atomic.safe_torch_load`): a crafted `checkpoint.pt` in a
run folder cannot run code. RNG states are therefore stored as tensors and plain lists."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckd.atomic import atomic_save, safe_torch_load

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG state as weights_only-loadable values (tensors, lists, numbers)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [str(name), keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [int(version), list(mt), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(run_dir: str | Path, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, schedule: dict, epoch: int,
                        step: int, best_acc: float, last_acc: float,
                        config: dict, method_modules: torch.nn.Module | None = None) -> Path:
    """`epoch` is the number of finished epochs (the epoch a resume starts at);
    `method_modules`: the feature methods' trainable modules (CRD's memories, ...)."""
    path = Path(run_dir) / CHECKPOINT
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule, "epoch": epoch, "step": step, "best_acc": best_acc,
             "last_acc": last_acc, "rng": rng_state(), "config": config}
    if method_modules is not None:
        state["method_modules"] = method_modules.state_dict()
    atomic_save(state, path)
    return path


def load_training_state(run_dir: str | Path, device: torch.device) -> dict[str, Any] | None:
    """The run folder's training state, or None. Refuses (ValueError naming the file) what
    weights_only loading refuses: a checkpoint.pt holding arbitrary Python objects."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return safe_torch_load(
        path, map_location=device, what="training checkpoint",
        convert_hint=(f"ckd writes only tensors and plain values there, so this file was not "
                      f"written by this version of ckd: delete {path} (or use another --out) "
                      "and train again, only resuming from checkpoints you made."))

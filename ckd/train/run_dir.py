"""A run folder: one writer at a time, and a resume that continues the same experiment.

`--resume` continues a run from its last checkpoint only with the settings it was trained
with: a changed setting would otherwise be written to `config.yaml` as if the earlier
epochs had used it. `--resume-allow FIELD,...` continues anyway and records each change
in `metrics.jsonl` (`"type": "config_change"`). `--overwrite` starts over in a folder
that holds a run: its checkpoint, metrics, config and student weights are replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ckd.locks import LockedError, exclusive_lock
from ckd.train.checkpoint import CHECKPOINT, load_training_state
from ckd.train.config import TrainConfig

# settings that change how a run is executed or reported, not what it computes
RESUME_NEUTRAL = frozenset({"out", "resume", "resume_allow", "overwrite", "progress",
                            "log_every", "eval_every", "cache_mode", "loader", "device",
                            "tensorboard"})
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "config.yaml", "student.pt")


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[Path]:
    def busy(who: str) -> LockedError:
        return LockedError(f"run folder {run_dir} is in use by another ckd process ({who}): "
                           "wait for that run to finish, or pass another --out")

    with exclusive_lock(run_dir, holder="ckd train", busy=busy) as path:
        yield path


def check_run_shape(run_dir: Path, students: list[str], cfg: TrainConfig) -> None:
    """One student's run and several students' sub-runs never share a folder: --resume on
    the other shape is refused (it would start a fresh run beside the old ones), a fresh
    run is refused unless --overwrite, which removes the other shape's run files."""
    if not run_dir.is_dir():
        return
    single = (run_dir / CHECKPOINT).is_file()
    subruns = sorted(p.name for p in run_dir.iterdir() if (p / CHECKPOINT).is_file())
    several = len(students) > 1
    if several and single:
        what, old = "one student's run", [run_dir]
        fix = "resume it with one --student and this --out"
    elif not several and subruns:
        what, old = f"the runs of several students ({', '.join(subruns)})", \
            [run_dir / name for name in subruns]
        fix = (f"resume them with `--student {','.join(subruns)} --out {run_dir} --resume`, "
               f"or one with `--student NAME --out {run_dir}/NAME --resume`")
    else:
        return
    if cfg.resume or not cfg.overwrite:
        asked = "--resume with " if cfg.resume else ""
        raise FileExistsError(
            f"{run_dir} holds {what}, not a run of {asked}--student {cfg.student}: {fix}; "
            "pass a new --out" + ("" if cfg.resume else ", or --overwrite to replace it"))
    for folder in old:  # --overwrite: the other shape's runs are replaced
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)


def changed_settings(old: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every setting that differs from the checkpoint's."""
    new = cfg.to_dict()
    return [(k, old[k], new[k]) for k in sorted(new)
            if k not in RESUME_NEUTRAL and k in old and old[k] != new[k]]


def resume_state(run_dir: Path, cfg: TrainConfig, device: torch.device) -> dict | None:
    """The state to resume from, or None to start fresh; refuses to mix two experiments
    in one folder (an existing run without --resume/--overwrite, or changed settings)."""
    state = load_training_state(run_dir, device)
    if state is None:
        return None
    if cfg.overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        return None
    if not cfg.resume:
        raise FileExistsError(
            f"{run_dir} already holds a training checkpoint (epoch {state.get('epoch')}): "
            "pass --resume to continue it, --overwrite to start over in it (its checkpoint, "
            "metrics and weights are replaced), or a new --out")
    diff = changed_settings(state.get("config", {}), cfg)
    allowed = set(cfg.resume_allow or ())
    refused = [d for d in diff if d[0] not in allowed]
    if refused:
        listing = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, a, b in refused)
        raise ValueError(
            f"--resume: {run_dir} was trained with other settings ({listing}). Use the same "
            "settings, a new --out, or continue anyway with --resume-allow "
            + ",".join(k for k, _, _ in refused) + " (each change is recorded in "
            "metrics.jsonl)")
    state["allowed_changes"] = [{"field": k, "old": a, "new": b} for k, a, b in diff]
    return state

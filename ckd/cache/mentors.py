"""Mentor checkpoints for the cache: alias -> checkpoint resolution, architecture, and
loading a frozen eval-mode model for the one mentor forward (`ckd.models.forward`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ckd.models import load_checkpoint, read_checkpoint_meta, resolve_arch
from ckd.models.forward import DEFAULT_PRECISION

_METAS: dict[tuple[str, int, int], dict[str, Any]] = {}  # (file, mtime, size) -> its meta


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """`read_checkpoint_meta`, read once per file version per process (a build asks for a
    mentor's arch several times; a changed file is read again)."""
    if not Path(path).is_file():
        return read_checkpoint_meta(path)  # the error naming how to get one
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _METAS:
        _METAS[key] = read_checkpoint_meta(path)
    return _METAS[key]


def mentor_arch(alias: str, path: Path) -> str:
    """Arch recorded in (or inferred from) the checkpoint, else the alias's arch. An alias
    that names an architecture (r14) must name the checkpoint's real one."""
    arch = checkpoint_meta(path).get("arch")
    try:
        named = resolve_arch(alias)
    except ValueError:
        named = None
    if arch:
        real = resolve_arch(str(arch))
        if named is not None and named != real:
            raise ValueError(
                f"mentor alias {alias!r} names {named} but {path} is a {real} checkpoint: "
                f"name it after its architecture ({real}={path}), or pass the {named} "
                "checkpoint you meant")
        return real
    if named is None:
        raise ValueError(f"cannot tell the architecture of {path} (mentor {alias!r}): name the "
                         "mentor after its arch, e.g. r110=path.pt")
    return named



def recorded_precision(mentor_attrs: dict[str, Any]) -> str:
    """The precision a cached mentor was computed at (older stores: fp32)."""
    return str(mentor_attrs.get("precision") or DEFAULT_PRECISION)


def _benefits_from_channels_last(model: torch.nn.Module) -> bool:
    # CNNs (many convolutions): NHWC kernels on CUDA; ViT/Mamba (one patch conv): no gain
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 2


def mentor_arch_kwargs(path: Path) -> dict:
    """The constructor keywords a ckd checkpoint records (a run's `--student-kwargs`)."""
    return dict(read_checkpoint_meta(path).get("arch_kwargs") or {})


def load_mentor(alias: str, path: Path, num_classes: int, device: torch.device
                ) -> torch.nn.Module:
    """Frozen eval-mode mentor on `device`; refuses a checkpoint with another class count.
    On CUDA a CNN is kept channels_last (`mentor_forward` feeds it NHWC); on CPU it stays
    contiguous, so fp32 results are those of the plain model."""
    model = load_checkpoint(path, arch=mentor_arch(alias, path), num_classes=num_classes)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.device(device).type == "cuda" and _benefits_from_channels_last(model):
        model = model.to(memory_format=torch.channels_last)
        model.ckd_channels_last = True
    return model


def _run_weights(path: Path) -> Path:
    """A trained run folder (`ckd train --out DIR`) stands for its final weights."""
    if path.is_dir():
        if not (path / "student.pt").is_file():
            raise ValueError(f"mentor folder {path} holds no student.pt: pass a finished "
                             "`ckd train` run folder or a checkpoint file")
        return path / "student.pt"
    return path


def resolve_mentors(spec: str | list[str], dataset_name: str,
                    mentor_dir: str | Path = "mentors") -> dict[str, Path]:
    """"r110,r8" / ["r110=path.pt", ...] -> {alias: checkpoint}. A bare alias is looked up
    as <mentor_dir>/<dataset>/<canonical arch>.pt (or <alias>.pt); alias=RUN_DIR takes a
    trained student's run folder (its student.pt) as a mentor."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    out: dict[str, Path] = {}
    for item in filter(None, items):
        alias, _, path = item.partition("=")
        alias = alias.strip()
        if alias in out:
            raise ValueError(f"mentor alias {alias!r} given twice")
        if path:
            out[alias] = _run_weights(Path(path.strip()))
            continue
        arch = resolve_arch(alias)  # ValueError listing the valid names
        base = Path(mentor_dir) / dataset_name
        cands = [base / f"{arch}.pt", base / f"{alias}.pt"]
        out[alias] = next((c for c in cands if c.is_file()), cands[0])
    if not out:
        raise ValueError("no mentors given: pass --mentors r110,r8 or alias=path.pt")
    return out

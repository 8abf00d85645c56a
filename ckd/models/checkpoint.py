"""Load/save model checkpoints: ckd's own format, RepDistiller's and plain state_dicts.

Every read goes through `torch.load(weights_only=True, map_location="cpu")`, so a
checkpoint can never run code; files that need full unpickling get conversion advice.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckd.atomic import atomic_save, safe_torch_load

from .registry import (
    ARCHS,
    arch_spec,
    canonical_arch,
    create_model,
    is_named_arch,
    state_shapes,
)

FORMAT_VERSION = 1
_HOW_TO_GET = ("train one with `ckd train-mentor --arch ARCH --dataset DATASET`, or pass a "
               "RepDistiller checkpoint (e.g. save/models/resnet110_cifar100_lr_0.05_decay_"
               "0.0005_trial_0/resnet110_best.pth) together with its arch")


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used as asked."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; {_HOW_TO_GET}")
    return safe_torch_load(path, error=CheckpointError, convert_hint=(
        "To convert it, only if you trust the file: `obj = torch.load(path, "
        "weights_only=False)`, take the model (or obj['model']) and re-save its weights with "
        "`torch.save({'model': model.state_dict()}, 'converted.pth')`, then load "
        "'converted.pth' with its arch."))


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()))


def _split(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(format, state_dict, top-level extras) for any of the three accepted layouts."""
    if isinstance(obj, Mapping) and "state_dict" in obj and "arch" in obj:
        fmt, sd = "ckd", obj["state_dict"]
    elif isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        fmt, sd = "repdistiller", obj["model"]
    elif isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        fmt, sd = "state_dict", obj["state_dict"]
    elif _is_state_dict(obj):
        fmt, sd = "state_dict", obj
    else:
        found = sorted(map(str, obj))[:12] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: unrecognised checkpoint layout (found {found}); expected ckd's "
            "{'arch', 'num_classes', 'state_dict', ...}, RepDistiller's {'model': state_dict, "
            "'epoch', ...} or a plain state_dict")
    if not _is_state_dict(sd):
        raise CheckpointError(f"{path}: the 'state_dict' entry is not a mapping of tensors")
    # top-level entries besides the weights: arch, epoch, accuracy, metrics ...
    extras = {} if sd is obj else {k: v for k, v in obj.items()
                                   if k not in ("model", "state_dict", "optimizer")}
    sd = _strip_wrappers(sd)
    return fmt, dict(sd), extras


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the key prefixes that wrappers add: nn.DataParallel/DDP ("module.", also in
    RepDistiller's multi-GPU files) and torch.compile ("_orig_mod."), in any nesting."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _signature(shapes: Mapping[str, tuple[int, ...]], classifier: str | None) -> frozenset:
    # Keys and shapes minus the classifier (depends on num_classes) and BN counters.
    return frozenset((k, s) for k, s in shapes.items()
                     if not k.endswith("num_batches_tracked")
                     and not (classifier and k.startswith(classifier + ".")))


_SWEEPS: dict[frozenset, str | None] = {}  # shape signature -> infer_arch's answer


def infer_arch(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The unique zoo arch whose keys and shapes match `sd` (classifier aside), else None.

    A sweep over the whole zoo (meta-device models): only for files that record nothing
    (RepDistiller, plain state_dicts) and for error messages; cached per process."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    key = frozenset(shapes.items())
    if key not in _SWEEPS:
        hits = [name for name, spec in ARCHS.items()
                if _signature(shapes, spec.classifier)
                == _signature(state_shapes(name), spec.classifier)]
        _SWEEPS[key] = hits[0] if len(hits) == 1 else None
    return _SWEEPS[key]


def _classes_in(sd: Mapping[str, torch.Tensor], arch: str) -> int | None:
    if is_named_arch(arch):  # an outside class: its classifier's name is unknown
        return None
    w = sd.get(arch_spec(arch).classifier + ".weight")
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def _plain(x: Any) -> Any:
    """Metrics/dataset info as plain Python (weights_only-safe, JSON-friendly)."""
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, bool | str) or x is None:
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x)
    return str(x)


def _meta_from(fmt: str, sd: dict, extras: dict) -> dict:
    if fmt == "ckd":
        return {"format": fmt, "arch": extras["arch"], "num_classes": extras.get("num_classes"),
                "dataset": _plain(extras.get("dataset")), "metrics": _plain(extras.get("metrics")),
                "arch_kwargs": dict(extras.get("arch_kwargs") or {})}
    arch = infer_arch(sd)
    metrics = {k: _plain(v) for k, v in extras.items() if k != "arch"}
    return {"format": fmt, "arch": arch,
            "num_classes": _classes_in(sd, arch) if arch else None,
            "dataset": None, "metrics": metrics or None}


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """{'format', 'arch', 'num_classes', 'dataset', 'metrics'}; for RepDistiller/plain files
    arch and num_classes are inferred from the weights (None if ambiguous), metrics are the
    file's other top-level entries (epoch, accuracy, best_acc ...)."""
    path = Path(path)
    fmt, sd, extras = _split(_torch_load(path), path)
    return _meta_from(fmt, sd, extras)


def _wrong_arch(sd: Mapping[str, torch.Tensor], canon: str, fmt: str, path: Path,
                given: str, arch_kwargs: Mapping[str, Any] | None) -> CheckpointError | None:
    """On an error path only: the error naming the arch the weights really are, when the
    zoo sweep finds another one (not with constructor kwargs: mamba_tiny with other widths
    may look like mamba_small)."""
    if arch_kwargs or (is_named_arch(canon) and not canon.startswith("torchvision:")):
        return None
    found = infer_arch(sd)
    if found is None or found == canon:
        return None
    if fmt == "ckd":  # a mislabelled ckd file
        return CheckpointError(f"checkpoint {path} records arch {canon} but its weights are "
                               f"{found}")
    return CheckpointError(f"checkpoint {path} is {found} but --arch {given} ({canon}) was "
                           "given")


def _check_shapes(sd: Mapping[str, torch.Tensor], arch: str, num_classes: int,
                  path: Path, given: str, arch_kwargs: Mapping[str, Any] | None = None,
                  expected: Mapping[str, tuple[int, ...]] | None = None,
                  fmt: str = "state_dict") -> None:
    """Refuse `sd` unless its keys and shapes are `arch`'s (`expected`: the shapes of an
    already built model; default: a meta-device model's), naming both on a mismatch."""
    if expected is None:
        expected = state_shapes(arch, num_classes, **dict(arch_kwargs or {}))
    found = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    other = _wrong_arch(sd, arch, fmt, path, given, arch_kwargs)
    if other is not None:
        raise other
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        parts.append("shape mismatches " + ", ".join(
            f"{k}: expected {expected[k]}, found {found[k]}" for k in wrong[:5]))
    said = "records" if fmt == "ckd" else "--arch"
    raise CheckpointError(f"checkpoint {path} does not fit {arch} "
                          f"({said} {given}): " + "; ".join(parts))


def load_checkpoint(path: str | os.PathLike, arch: str | None = None,
                    num_classes: int | None = None) -> nn.Module:
    """Model from a ckd, RepDistiller or plain-state_dict checkpoint, in eval mode on CPU.

    `arch` is required for foreign formats (they do not record it) and, when given for a
    ckd checkpoint, must agree with the stored one. `num_classes` defaults to what the
    checkpoint holds and, when given, must agree with the classifier's size.
    """
    path = Path(path)
    fmt, sd, extras = _split(_torch_load(path), path)
    arch_kwargs = dict(extras.get("arch_kwargs") or {}) if fmt == "ckd" else {}
    if fmt == "ckd":
        stored = canonical_arch(extras["arch"])
        if arch is not None and canonical_arch(arch) != stored:
            raise CheckpointError(f"checkpoint {path} is {stored} but --arch {arch} "
                                  f"({canonical_arch(arch)}) was given")
        canon, given = stored, arch or stored
    else:
        if arch is None:
            guess = infer_arch(sd)
            hint = f" (its weights look like {guess})" if guess else ""
            raise CheckpointError(f"{path} is a {fmt} checkpoint, which does not record its "
                                  f"architecture{hint}: pass arch (--arch), e.g. "
                                  f"--arch {guess or 'resnet110'}")
        canon, given = canonical_arch(arch), arch
    # The recorded (or given) arch is trusted and checked against the weights' shapes; the
    # zoo sweep runs only to name the real arch in an error.
    stored_nc = _classes_in(sd, canon)
    if fmt == "ckd" and extras.get("num_classes") is not None:
        stored_nc = int(extras["num_classes"])
    if num_classes is not None and stored_nc is not None and num_classes != stored_nc:
        # a wrong arch usually also shows up as a wrong class count, less helpfully
        other = _wrong_arch(sd, canon, fmt, path, given, arch_kwargs)
        raise other or CheckpointError(f"checkpoint {path}: classifier has {stored_nc} "
                                       f"classes, expected {num_classes}")
    nc = num_classes if num_classes is not None else stored_nc
    if nc is None:
        _check_shapes(sd, canon, 1, path, given, arch_kwargs, fmt=fmt)  # raises: no classifier
        raise CheckpointError(f"{path}: cannot tell num_classes; pass num_classes")
    model = create_model(canon, nc, **arch_kwargs)
    _check_shapes(sd, canon, nc, path, given, arch_kwargs, fmt=fmt,
                  expected={k: tuple(v.shape) for k, v in model.state_dict().items()})
    # Very old checkpoints predate BN's num_batches_tracked buffer; it does not affect eval.
    result = model.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if bad or result.unexpected_keys:  # _check_shapes should have caught these
        raise CheckpointError(f"{path}: state_dict does not fit {canon}: missing {bad[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, arch: str, num_classes: int,
                    dataset: Any, metrics: Mapping[str, Any] | None,
                    arch_kwargs: Mapping[str, Any] | None = None) -> Path:
    """Write ckd's format atomically (`ckd.atomic.atomic_save`).
    `arch` is a zoo name or a "module.path:ClassName"; `arch_kwargs` its constructor's
    keyword arguments (recorded, so `load_checkpoint` rebuilds the same model)."""
    path = Path(path)
    canon = canonical_arch(arch)
    arch_kwargs = _plain(dict(arch_kwargs or {}))
    # contiguous CPU copies: a channels_last / CUDA / compiled / DDP model saves the same
    sd = _strip_wrappers({k: v.detach().cpu().contiguous().clone()
                          for k, v in model.state_dict().items()})
    _check_shapes(sd, canon, num_classes, path, arch, arch_kwargs)  # refuse a mislabelled file
    payload = {"format": "ckd", "format_version": FORMAT_VERSION, "arch": canon,
               "num_classes": int(num_classes), "state_dict": sd, "arch_kwargs": arch_kwargs,
               "dataset": _plain(dataset), "metrics": _plain(dict(metrics or {}))}
    atomic_save(payload, path)
    return path

"""Mentor checkpoints for the cache: alias -> checkpoint resolution, architecture, and
loading a frozen eval-mode model for the one mentor forward (`ckd.models.forward`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ckd.models import load_checkpoint, read_checkpoint_meta, resolve_arch
from ckd.models.external import PREFIXES, input_config
from ckd.models.forward import DEFAULT_PRECISION
from ckd.models.registry import arch_spec, canonical_arch, is_named_arch, meta_model

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


# A mentor named by builder and checkpoint (NAME=timm:MODEL:FILE, NAME=torchvision:ARCH:FILE,
# NAME=module.path:Class:FILE): the checkpoint file -> the architecture its spec names, for
# every later step of this process that holds only (alias, path).
_NAMED: dict[str, str] = {}
_IMPORT_SPEC = re.compile(r"([A-Za-z_][\w.]*:[A-Za-z_][\w.]*):(.+)")


def parse_mentor_value(value: str) -> tuple[str | None, Path]:
    """The part after NAME= -> (architecture named by the spec or None, checkpoint path):
    "timm:vit_small_patch16_224:w.pth", "torchvision:resnet50:w.pth",
    "pkg.mod:Class:w.pth", or a plain path (its architecture from the file or the alias)."""
    value = value.strip()
    if value.startswith(PREFIXES):
        kind, _, rest = value.partition(":")
        model, sep, path = rest.partition(":")
        if not (model and sep and path):
            raise ValueError(f"mentor spec {value!r}: expected {kind}:<model>:<checkpoint>, "
                             f"e.g. {kind}:resnet50:weights.pth (weights are never downloaded)")
        return f"{kind}:{model}", Path(path)
    m = _IMPORT_SPEC.fullmatch(value)
    if m and not Path(value).exists():
        return m.group(1), Path(m.group(2))
    return None, Path(value)


def name_mentor_arch(path: Path, arch: str) -> None:
    """Record that checkpoint `path` holds the weights of `arch` (from its mentor spec)."""
    _NAMED[str(Path(path).resolve())] = arch


def named_arch(path: Path) -> str | None:
    return _NAMED.get(str(Path(path).resolve()))


def mentor_arch(alias: str, path: Path) -> str:
    """Arch named by the mentor's spec, else recorded in (or inferred from) the checkpoint,
    else the alias's arch. An alias that names an architecture (r14) must name the
    checkpoint's real one."""
    spec = named_arch(path)
    if spec is not None:
        return spec
    arch = checkpoint_meta(path).get("arch")
    try:
        named = resolve_arch(alias)
    except ValueError:
        named = None
    if arch:
        real = canonical_arch(str(arch))
        if named is not None and named != real and not is_named_arch(real):
            raise ValueError(
                f"mentor alias {alias!r} names {named} but {path} is a {real} checkpoint: "
                f"name it after its architecture ({real}={path}), or pass the {named} "
                "checkpoint you meant")
        return real
    if named is None:
        raise ValueError(f"cannot tell the architecture of {path} (mentor {alias!r}): name the "
                         "mentor after its arch, e.g. r110=path.pt, or name its builder: "
                         f"{alias}=timm:MODEL:{path}, {alias}=torchvision:ARCH:{path} or "
                         f"{alias}=module.path:Class:{path}")
    return named


def mentor_input(alias: str, arch: str, model: torch.nn.Module | None,
                 resolution: int | None) -> dict[str, Any]:
    """{'resolution', and 'mean'/'std' when the model's own config gives them}: the
    `--resolution ALIAS=PX` override, else the model's config (timm's pretrained_cfg,
    torchvision's convention), else the zoo arch's input size."""
    if model is None and is_named_arch(arch):
        model = meta_model(arch)
    cfg = input_config(arch, model) or {}
    out = {k: cfg[k] for k in ("mean", "std") if k in cfg}
    if resolution is not None:
        return {**out, "resolution": int(resolution)}
    if "resolution" in cfg:
        return {**out, "resolution": int(cfg["resolution"])}
    if is_named_arch(arch):
        raise ValueError(f"mentor {alias!r} ({arch}) does not say its input size: pass "
                         f"--resolution {alias}=PIXELS")
    return {**out, "resolution": int(arch_spec(arch).input_size)}


class Renormalized(torch.nn.Module):
    """A mentor whose own normalisation differs from the data's: input normalised with the
    data's (mean, std) is re-normalised with the mentor's, x * a + b per channel."""

    def __init__(self, model: torch.nn.Module, data: tuple, own: tuple) -> None:
        super().__init__()
        self.model = model
        (dm, ds), (om, os_) = data, own
        a = torch.tensor([d / o for d, o in zip(ds, os_, strict=True)]).view(1, -1, 1, 1)
        b = torch.tensor([(m - n) / o for m, n, o in zip(dm, om, os_, strict=True)])
        self.register_buffer("scale", a, persistent=False)
        self.register_buffer("shift", b.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, **kw: Any) -> Any:
        return self.model(x * self.scale + self.shift, **kw)


def check_resolution(model: torch.nn.Module, alias: str, arch: str, size: int,
                     device: torch.device) -> None:
    """One blank image at `size` px through the mentor: a size it cannot take is refused
    by name before any work."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    except Exception as err:  # noqa: BLE001 - any failure: the model refuses this size
        raise ValueError(f"mentor {alias!r} ({arch}) cannot take {size} px inputs "
                         f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}): "
                         f"pass --resolution "
                         f"{alias}=PIXELS with the size it was built for") from err




def recorded_precision(mentor_attrs: dict[str, Any]) -> str:
    """The precision a cached mentor was computed at (older stores: fp32)."""
    return str(mentor_attrs.get("precision") or DEFAULT_PRECISION)


def _benefits_from_channels_last(model: torch.nn.Module) -> bool:
    # CNNs (many convolutions): NHWC kernels on CUDA; ViT/Mamba (one patch conv): no gain
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 2


def mentor_arch_kwargs(path: Path) -> dict:
    """The constructor keywords a ckd checkpoint records (a run's `--student-kwargs`)."""
    return dict(read_checkpoint_meta(path).get("arch_kwargs") or {})


def load_mentor(alias: str, path: Path, num_classes: int, device: torch.device,
                norm: tuple | None = None) -> torch.nn.Module:
    """Frozen eval-mode mentor on `device`; refuses a checkpoint with another class count.
    `norm`: the data's (mean, std); a mentor whose own config normalises otherwise (a timm
    or torchvision mentor) is wrapped to re-normalise its input. On CUDA a CNN is kept
    channels_last (`mentor_forward` feeds it NHWC); on CPU it stays contiguous, so fp32
    results are those of the plain model."""
    arch = mentor_arch(alias, path)
    model = load_checkpoint(path, arch=arch, num_classes=num_classes)
    own = input_config(arch, model)
    if norm is not None and own and "mean" in own and \
            (tuple(own["mean"]), tuple(own["std"])) != (tuple(norm[0]), tuple(norm[1])):
        model = Renormalized(model, (tuple(norm[0]), tuple(norm[1])),
                             (own["mean"], own["std"])).eval()
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.device(device).type == "cuda" and _benefits_from_channels_last(model):
        model = model.to(memory_format=torch.channels_last)
        model.ckd_channels_last = True
    return model


def load_recorded_mentor(alias: str, attrs: dict[str, Any], num_classes: int,
                         device: torch.device, norm: tuple) -> torch.nn.Module:
    """The mentor a cache recorded (its checkpoint, built as the arch it recorded: a timm
    or torchvision mentor's file alone does not say), as the build loaded it."""
    path = Path(attrs["checkpoint"])
    name_mentor_arch(path, str(attrs["arch"]))
    return load_mentor(alias, path, num_classes, device, norm=norm)




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
    trained student's run folder (its student.pt) as a mentor; alias=timm:MODEL:FILE,
    alias=torchvision:ARCH:FILE and alias=module.path:Class:FILE name the builder of a plain
    state_dict (`parse_mentor_value`)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    out: dict[str, Path] = {}
    for item in filter(None, items):
        alias, _, path = item.partition("=")
        alias = alias.strip()
        if alias in out:
            raise ValueError(f"mentor alias {alias!r} given twice")
        if path:
            arch, file = parse_mentor_value(path)
            out[alias] = _run_weights(file)
            if arch is not None:
                name_mentor_arch(out[alias], arch)
            continue
        arch = resolve_arch(alias)  # ValueError listing the valid names
        base = Path(mentor_dir) / dataset_name
        cands = [base / f"{arch}.pt", base / f"{alias}.pt"]
        out[alias] = next((c for c in cands if c.is_file()), cands[0])
    if not out:
        raise ValueError("no mentors given: pass --mentors r110,r8 or alias=path.pt")
    return out

"""Everything the loop needs, resolved and checked before the first step: data, loaders,
the mentor source (cache or online checkpoints), the student. Errors here name the fix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ckd.train.config import TrainConfig
from ckd.train.methods import METHODS, select_mentors


def load_data(cfg: TrainConfig):
    """The `Dataset` (from --prepared betons or by --dataset name)."""
    from ckd.data import load_dataset  # noqa: PLC0415

    if cfg.prepared is not None:
        from ckd.data.beton import load_prepared  # noqa: PLC0415

        ds = load_prepared(cfg.prepared)
        if cfg.dataset is not None and _norm(cfg.dataset) != _norm(ds.name):
            raise ValueError(f"--prepared {cfg.prepared} holds dataset {ds.name!r} but "
                             f"--dataset {cfg.dataset!r} was given: drop one of them")
        return ds
    return load_dataset(cfg.dataset, cfg.data_dir, **cfg.dataset_options)


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def make_loaders(cfg: TrainConfig, ds, device: torch.device, rank: int, world: int):
    from ckd.data.loaders import make_loader  # noqa: PLC0415

    if cfg.loader == "ffcv":
        src_train = Path(cfg.prepared) / "train.beton"
        src_test = Path(cfg.prepared) / "test.beton"
    else:
        src_train, src_test = ds.train, ds.test
    train = make_loader(cfg.loader, src_train, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle=True, drop_last=False, device=str(device), rank=rank,
                        world_size=world)
    test = make_loader(cfg.loader, src_test, batch_size=max(256, cfg.batch_size),
                       seed=cfg.seed, shuffle=False, drop_last=False, device=str(device),
                       rank=rank, world_size=world)
    return train, test


def parse_mentor_specs(specs: list[str] | None) -> list[tuple[str, str | None]]:
    """["r110", "peer=path.pt"] -> [("r110", None), ("peer", "path.pt")]."""
    out = []
    for s in specs or []:
        name, _, path = s.partition("=")
        if not name.strip():
            raise ValueError(f"bad mentor {s!r}: use NAME or NAME=path/to/checkpoint.pt")
        out.append((name.strip(), path.strip() or None))
    return out


def _match(name: str, available: list[str]) -> str:
    """A requested mentor name among the cached ones (exact, else same architecture)."""
    if name in available:
        return name
    arch = _safe_arch(name)
    hits = [a for a in available if arch is not None and _safe_arch(a) == arch]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"mentor {name!r} is not in the cache; cached mentors: "
                     f"{', '.join(available)} (pass --mentors as a subset of them, teacher "
                     "first)")


def _safe_arch(name: str) -> str | None:
    from ckd.models import resolve_arch  # noqa: PLC0415

    try:
        return resolve_arch(name)
    except ValueError:
        return None


@dataclass
class MentorSource:
    """Where mentor logits come from: `logits(epoch, x, idx) -> [M,B,C] | None` and the view
    ids of a batch `views(epoch, idx) -> (slots, view_ids)`."""

    names: list[str]
    views: Callable[[int, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]
    logits: Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor | None]
    kind: str  # "cache" | "online" | "none"
    models: list[nn.Module] | None = None
    start_epoch: Callable[[int, torch.Tensor | None], None] = lambda epoch, indices: None
    cache: object | None = None


def _online_views(seed: int):
    from ckd.cache.layout import epoch_seed  # noqa: PLC0415 - one rule, shared with the cache
    from ckd.data.views import view_ids  # noqa: PLC0415

    def views(epoch: int, idx: torch.Tensor):
        return None, view_ids(epoch_seed(seed, epoch), idx)

    return views


def default_mentor_order(found: dict[str, dict]) -> list[str]:
    """Cached mentors, teacher first: mentor 0 is the largest model (METHOD.md), so order
    by parameter count, then test accuracy (both descending), then alias."""
    from ckd.models import param_count  # noqa: PLC0415

    def key(alias: str):
        a = found[alias]
        try:
            n = param_count(a.get("arch", alias), int(a.get("num_classes", 100)))
        except (ValueError, KeyError):
            n = 0
        return (-n, -float(a.get("test_acc") or 0.0), alias)

    return sorted(found, key=key)


def make_mentor_source(cfg: TrainConfig, ds, device: torch.device,
                       autocast: Callable) -> MentorSource:
    """Open the cache (checked against the data) or load the online mentors."""
    specs = parse_mentor_specs(cfg.mentors)
    need = METHODS[cfg.method].mentors != "none"
    names: list[str] = []
    cache = None
    if cfg.cache is not None and not (cfg.mentors_online and not need):
        from ckd.cache import LogitCache, list_mentors  # noqa: PLC0415

        found = list_mentors(cfg.cache)
        if not found:
            raise FileNotFoundError(f"no mentors in a logit cache at {cfg.cache}: build it "
                                    f"with `ckd cache-logits --out {cfg.cache} ...`")
        avail = default_mentor_order(found)
        if need and not cfg.mentors_online:
            names = [_match(n, avail) for n, _ in specs] if specs else avail
            names = select_mentors(cfg.method, names)
        else:
            names = avail[:1]  # only views/compatibility are needed: load the least
        cache = LogitCache(cfg.cache, mode=cfg.cache_mode, device=str(device), mentors=names)
        cache.check_compatible(ds.name, ds.fingerprint, ds.num_classes)
        if cache.num_classes != ds.num_classes:
            raise ValueError(f"student {cfg.student} gets {ds.num_classes} classes from "
                             f"{ds.name} but the cache holds {cache.num_classes}-class logits")
        if cfg.mentors_online:
            # no NAME=PATH given: the checkpoint the cache was built from, if it is there
            specs = specs or [(n, None) for n in avail]
            specs = [(n, p or _cached_checkpoint(found.get(n))) for n, p in specs]
    if not need:
        views = (lambda e, idx: cache.epoch_views(e, idx, cfg.seed)) if cache is not None \
            else _online_views(cfg.seed)
        return MentorSource([], views, lambda slots, idx, x: None, "none")
    if cfg.mentors_online:
        names = select_mentors(cfg.method, [n for n, _ in specs])
        models = [_load_online(n, p, cfg, ds, device) for n, p in specs[:len(names)]]
        # the cache's view rule when there is a cache, else the same rule computed here
        views = (lambda e, idx: (None, cache.epoch_views(e, idx, cfg.seed)[1])) \
            if cache is not None else _online_views(cfg.seed)

        # CPU: run the mentors on contiguous input, as `ckd cache-logits` does, so online
        # logits equal cached fp32 logits; CUDA: channels_last mentors (speed)
        to_mentor = (lambda x: x) if device.type == "cuda" else (lambda x: x.contiguous())

        @torch.no_grad()
        def logits(slots, idx, x):
            xm = to_mentor(x)
            with autocast():
                return torch.stack([m(xm) for m in models])

        return MentorSource(names, views, logits, "online", models)
    if cache is None:
        raise ValueError(f"method {cfg.method!r} needs mentor logits: pass --cache DIR (built "
                         "with `ckd cache-logits`) or --mentors-online with --mentors, or use "
                         "--method nokd")

    def views(epoch, idx):
        return cache.epoch_views(epoch, idx, cfg.seed)

    def logits(slots, idx, x):
        return cache.gather(slots, idx)  # the cache was opened with `names`, in order

    def start_epoch(epoch, indices):
        cache.start_epoch(epoch, cfg.seed, indices)  # stream mode: plan + prefetch

    return MentorSource(names, views, logits, "cache", start_epoch=start_epoch, cache=cache)


def _cached_checkpoint(attrs: dict | None) -> str | None:
    path = (attrs or {}).get("checkpoint")
    return path if path and Path(path).is_file() else None


def mentor_path(name: str, path: str | None, cfg: TrainConfig, ds) -> Path:
    """NAME=PATH, else the cache CLI's rule: <mentor-dir>/<dataset>/<arch>.pt (or
    <alias>.pt), mentor-dir defaulting to ./mentors."""
    if path is not None:
        return Path(path)
    from ckd.cache.mentors import resolve_mentors  # noqa: PLC0415 - one rule for both

    try:
        return resolve_mentors([name], ds.name, cfg.mentor_dir or "mentors")[name]
    except ValueError as err:
        raise ValueError(f"online mentor {name!r} is not an architecture name, so it needs a "
                         f"checkpoint: pass --mentors {name}=PATH ({err})") from err


def _load_online(name: str, path: str | None, cfg: TrainConfig, ds,
                 device: torch.device) -> nn.Module:
    from ckd.models import load_checkpoint, read_checkpoint_meta  # noqa: PLC0415

    p = mentor_path(name, path, cfg, ds)
    if not p.is_file():
        raise FileNotFoundError(f"mentor {name!r}: no checkpoint at {p}; train it with "
                                f"`ckd train-mentor --arch {name} --dataset {ds.name}` or "
                                f"pass --mentors {name}=PATH")
    meta = read_checkpoint_meta(p)
    if meta.get("num_classes") not in (None, ds.num_classes):
        raise ValueError(f"mentor {name!r} ({p}) has {meta['num_classes']} classes, "
                         f"{ds.name} has {ds.num_classes}")
    if meta.get("dataset") and _norm(str(meta["dataset"])) != _norm(ds.name):
        raise ValueError(f"mentor {name!r} ({p}) was trained on {meta['dataset']!r}, not "
                         f"{ds.name!r}: pass the right --mentor-dir or NAME=PATH")
    model = load_checkpoint(p).to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model

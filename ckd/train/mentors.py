"""Where a training step's mentor logits come from: three small sources.

- `NoMentors`: methods that read no mentor (nokd); views still follow the cache's rule
  when a cache is given, else the online rule.
- `CachedMentors`: rows gathered from a logit cache (`ckd cache-logits`).
- `OnlineMentors`: frozen mentors run on the student's view every step (the slow path the
  cache replaces; also the reference the exactness tests compare the cache with).

All three answer `views(epoch, idx) -> (slots, view_ids)`, `gather(slots, idx, x, needs,
labels)` and `start_epoch(epoch, order)`, so the loop never asks which one it has. Given
`labels`, `gather` also returns the mentors' row statistics (`ckd.mentor_stats`): the cache's
stored ones, or the same function applied to the online mentors' logits, so cached and
online training stay equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckd.cache import list_mentors, open_cache
from ckd.cache.mentors import (
    check_resolution,
    load_mentor,
    mentor_arch,
    mentor_input,
    name_mentor_arch,
    named_arch,
    recorded_precision,
    resolve_mentors,
)
from ckd.cache.rows import RowSource
from ckd.data.protocol import TrainingData, ViewRecipe
from ckd.data.views import CIFAR_VIEWS, normalize
from ckd.mentor_stats import STAT_FIELDS, mentor_row_stats
from ckd.methods import LossPlan, method_mentors, select_mentors
from ckd.methods.loss import check_sparse_method
from ckd.models import file_sha256, param_count, read_checkpoint_meta, resolve_arch
from ckd.models.forward import mentor_features, mentor_forward
from ckd.models.registry import is_named_arch
from ckd.train.features import feature_needs
from ckd.train.setup import norm_name


class NoMentors:
    kind = "none"
    sizes: tuple[int, ...] = ()  # image folders: the resolutions online mentors read

    def __init__(self, seed: int, cache: RowSource | None = None, *,
                 recipe: ViewRecipe = CIFAR_VIEWS) -> None:
        self.names: list[str] = []
        self.seed, self.cache, self.recipe = seed, cache, recipe

    def views(self, epoch: int, idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Which cached slot (None online) and which view each sample gets in `epoch`: the
        cache's rule when there is a cache, else the data's view recipe (the same rule)."""
        if self.cache is not None:
            return self.cache.epoch_views(epoch, idx, self.seed)
        return None, self.recipe.epoch_view_ids(self.seed, epoch, idx)

    def logits(self, slots: torch.Tensor | None, idx: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor | None:
        return None

    def gather(self, slots: torch.Tensor | None, idx: torch.Tensor, x: torch.Tensor,
               needs: tuple[str, ...] = (), labels: torch.Tensor | None = None
               ) -> tuple[Any, torch.Tensor | None, dict[str, list]]:
        """(mentor logits, their row statistics [M, B, 2] fp32 or None, {feature name: one
        tensor per mentor}) for one step; `needs` names the features the method reads
        (`pool`, `map`); `labels` (the batch's true classes) asks for the statistics."""
        return self.logits(slots, idx, x), None, {}

    def start_epoch(self, epoch: int, order: torch.Tensor | None) -> None:
        return None

    def attach(self, train_loader: Any) -> None:
        """The training loader whose batches the mentors read (image folders online)."""
        return None
    def close(self) -> None:
        """Stop the cache's reader (a stream cache's prefetch thread), if there is one."""
        if self.cache is not None:
            self.cache.close()


class CachedMentors(NoMentors):
    kind = "cache"

    def __init__(self, cache: RowSource, seed: int) -> None:
        super().__init__(seed, cache)
        self.names = list(cache.mentors)  # opened with the chosen mentors, teacher first

    def logits(self, slots, idx, x):
        return self.cache.gather(slots, idx)

    def gather(self, slots, idx, x, needs=(), labels=None):
        with_stats = labels is not None and self.cache.stat_fields == STAT_FIELDS
        return self.cache.gather_rows(slots, idx, with_stats=with_stats, features=needs)

    def start_epoch(self, epoch, order):
        self.cache.start_epoch(epoch, self.seed, order)  # stream mode: plan + prefetch


class OnlineMentors(NoMentors):
    kind = "online"

    def __init__(self, models: list[nn.Module], names: list[str], seed: int,
                 cache: RowSource | None, precisions: str | list[str], *,
                 recipe: ViewRecipe = CIFAR_VIEWS) -> None:
        super().__init__(seed, cache, recipe=recipe)
        self.models, self.names = models, names
        if isinstance(precisions, str):
            precisions = [precisions] * len(models)
        self.precisions = precisions  # each the forward `ckd cache-logits --precision` runs
        self.forward = mentor_forward

    def views(self, epoch, idx):
        return None, super().views(epoch, idx)[1]  # no cached rows to point at

    @torch.no_grad()
    def logits(self, slots, idx, x):
        return torch.stack([self.forward(m, x, p)
                            for m, p in zip(self.models, self.precisions, strict=True)])

    @torch.no_grad()
    def gather(self, slots, idx, x, needs=(), labels=None):
        if not needs:
            logits, feats = self.logits(slots, idx, x), {}
        else:
            # one forward gives the logits and the features
            outs = [self.forward(m, x, p, features=True)
                    for m, p in zip(self.models, self.precisions, strict=True)]
            per = [mentor_features(f, needs) for f, _ in outs]
            logits = torch.stack([z for _, z in outs])
            feats = {n: [f[n].float() for f in per] for n in needs}
        # the cache's statistics come from the logits as stored; online ones from the
        # logits as the loss reads them: the same function of the same values
        stats = None if labels is None else mentor_row_stats(logits, labels)
        return logits, stats, feats


class ImageOnlineMentors(OnlineMentors):
    """Online mentors on an image folder: each runs on the batch's crop boxes decoded at its
    own resolution (the training loader decodes every size in one pass: `current`),
    normalised with the data's statistics as `ckd cache-logits` feeds them, so online
    logits equal the cached ones."""

    def __init__(self, models: list[nn.Module], names: list[str], seed: int, cache: Any,
                 precisions: list[str], sizes: list[int], mean: tuple, std: tuple, *,
                 recipe: ViewRecipe = CIFAR_VIEWS) -> None:
        super().__init__(models, names, seed, cache, precisions, recipe=recipe)
        self.sizes, self.mean, self.std = tuple(sizes), mean, std
        self.loader: Any = None

    def attach(self, train_loader):
        self.loader = train_loader

    @torch.no_grad()
    def logits(self, slots, idx, x):
        got, by_size = self.loader.current
        if not torch.equal(got, idx):
            raise RuntimeError("online image mentors read another batch than the student's")
        return torch.stack([
            self.forward(m, normalize(by_size[s], self.mean, self.std).permute(0, 3, 1, 2), p)
            for m, p, s in zip(self.models, self.precisions, self.sizes, strict=True)])

    def gather(self, slots, idx, x, needs=(), labels=None):
        if needs:
            raise ValueError("feature methods are not supported on image folders yet: use a "
                             "logit method (`ckd methods`)")
        logits = self.logits(slots, idx, x)
        return logits, None if labels is None else mentor_row_stats(logits, labels), {}


MentorSource = NoMentors | CachedMentors | OnlineMentors


def parse_mentor_specs(specs: list[str] | None) -> list[tuple[str, str | None]]:
    """["r110", "peer=path.pt"] -> [("r110", None), ("peer", "path.pt")]."""
    out = []
    for s in specs or []:
        name, _, path = s.partition("=")
        if not name.strip():
            raise ValueError(f"bad mentor {s!r}: use NAME or NAME=path/to/checkpoint.pt")
        out.append((name.strip(), path.strip() or None))
    return out


def _safe_arch(name: str) -> str | None:
    try:
        return resolve_arch(name)
    except ValueError:
        return None


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


def default_mentor_order(found: dict[str, dict]) -> list[str]:
    """Cached mentors, teacher first: mentor 0 is the largest model (docs/METHODS.md), so
    order by parameter count, then test accuracy (both descending), then alias."""

    def key(alias: str):
        a = found[alias]
        try:
            n = param_count(a.get("arch", alias), int(a.get("num_classes", 100)))
        except (ValueError, KeyError):
            n = 0
        return (-n, -float(a.get("test_acc") or 0.0), alias)

    return sorted(found, key=key)


def default_precision(device: torch.device, amp: bool, deterministic: bool) -> str:
    """An online mentor's forward precision when neither --mentor-precision nor a cache
    says: what the trainer's autocast used before the option existed (bf16 with --amp on
    CUDA), fp32 with --deterministic (as `ckd cache-logits` runs them by default)."""
    return "bf16" if device.type == "cuda" and amp and not deterministic else "fp32"


def online_precisions(precision: str | None, default: str, names: list[str],
                      found: dict[str, dict], cache: str | None) -> list[str]:
    """Each online mentor's forward precision: `precision` (--mentor-precision), else the
    one its entry in the `cache` was computed at (so cached == online holds), else
    `default`. An explicit --mentor-precision must match the cache's mentors."""
    if precision is not None:
        _check_precisions(cache, found, names, precision)
        return [precision] * len(names)
    return [recorded_precision(found[n]) if n in found else default for n in names]


def _check_precisions(cache: str | None, found: dict[str, dict], names: list[str],
                      precision: str) -> None:
    """Refuse a --mentor-precision other than the one a cached mentor was computed at."""

    for n in names:
        if n in found and recorded_precision(found[n]) != precision:
            raise ValueError(
                f"mentor {n!r} in the cache {cache} was computed at --precision "
                f"{recorded_precision(found[n])}, --mentor-precision {precision} was given: "
                f"pass --mentor-precision {recorded_precision(found[n])} (or leave it out), "
                f"or rebuild the cache with `ckd cache-logits --out {cache} --precision "
                f"{precision} --overwrite ...`")


def make_mentor_source(ds: TrainingData, device: torch.device, plan: LossPlan, *, cache: str | None,
                       cache_mode: str, mentors: list[str] | None, online: bool,
                       precision: str | None, fallback_precision: str, mentor_dir: str | None,
                       seed: int) -> MentorSource:
    """Open the `cache` (checked against the data) and/or load the `online` mentors that
    `plan` reads: `mentors` the --mentors specs, `precision` --mentor-precision (else the
    cache's, else `fallback_precision`: `default_precision`), `seed` the run's (views)."""
    specs = parse_mentor_specs(mentors)
    need = method_mentors(plan.expr) != "none"
    opened, found = None, {}
    if cache is not None and not (online and not need):
        opened, found, specs = _open_cache(cache, cache_mode, plan, online, ds, device,
                                           specs, need)
    if not need:
        return NoMentors(seed, opened, recipe=ds.recipe)
    if online:
        names = select_mentors(plan.expr, [n for n, _ in specs])
        precisions = online_precisions(precision, fallback_precision, names, found, cache)
        models = [_load_online(n, p, mentor_dir, cache, ds, device, found.get(n))
                  for n, p in specs[:len(names)]]
        if ds.recipe.num_views is None:  # an image folder's crops: each mentor at its own size
            sizes = [_online_size(n, p, m, mentor_dir, ds, device, found.get(n))
                     for (n, p), m in zip(specs, models, strict=False)]
            return ImageOnlineMentors(models, names, seed, opened, precisions, sizes,
                                      ds.mean, ds.std, recipe=ds.recipe)
        return OnlineMentors(models, names, seed, opened, precisions, recipe=ds.recipe)
    if opened is None:
        raise ValueError(f"method {plan.expr!r} needs mentor logits: pass --cache DIR (built "
                         "with `ckd cache-logits`) or --mentors-online with --mentors, or use "
                         "--method nokd")
    if precision is not None:
        _check_precisions(cache, found, opened.mentors, precision)
    return CachedMentors(opened, seed)


def _open_cache(path: str, mode: str, plan: LossPlan, online: bool, ds, device: torch.device,
                specs: list[tuple[str, str | None]], need: bool):
    """(cache, its mentors' attributes, specs): the cache at `path` opened with the mentors
    the method reads (or the least needed for its view rule) and checked against the
    data."""
    found = list_mentors(path)
    if not found:
        raise FileNotFoundError(f"no mentors in a logit cache at {path}: build it "
                                f"with `ckd cache-logits --out {path} ...`")
    avail = default_mentor_order(found)
    if need and not online:
        names = [_match(n, avail) for n, _ in specs] if specs else avail
        names = select_mentors(plan.expr, names)
    else:
        names = avail[:1]  # only views/compatibility are needed: load the least
    needs = feature_needs(plan.terms) if need and not online else ()
    cache = open_cache(path, mode=mode, device=str(device), mentors=names, features=needs)
    cache.check_compatible(ds.name, ds.fingerprint, ds.num_classes)
    if need and not online and cache.sparse:  # refused now, not at the 1st step
        check_sparse_method(plan.logit_term.method)
    if online:
        # no NAME=PATH given: the checkpoint the cache was built from, if it is there
        specs = specs or [(n, None) for n in avail]
        specs = [(n, p or _cached_checkpoint(found.get(n))) for n, p in specs]
    return cache, found, specs


def _cached_checkpoint(attrs: dict | None) -> str | None:
    path = (attrs or {}).get("checkpoint")
    return path if path and Path(path).is_file() else None


def mentor_path(name: str, path: str | None, mentor_dir: str | None, dataset: str) -> Path:
    """NAME=PATH, else the cache CLI's rule: <mentor-dir>/<dataset>/<arch>.pt (or
    <alias>.pt), mentor-dir defaulting to ./mentors."""
    if path is not None:  # a file, a run folder, or a builder spec (timm:MODEL:FILE, ...)
        return resolve_mentors([f"{name}={path}"], dataset)[name]
    try:
        return resolve_mentors([name], dataset, mentor_dir or "mentors")[name]
    except ValueError as err:
        raise ValueError(f"online mentor {name!r} is not an architecture name, so it needs a "
                         f"checkpoint: pass --mentors {name}=PATH ({err})") from err


def _online_size(name: str, path: str | None, model: nn.Module, mentor_dir: str | None,
                 ds: TrainingData, device: torch.device, cached: dict | None) -> int:
    """An online mentor's resolution on an image folder: the one its cache entry was
    computed at, else its own config's (`mentor_input`); refused by name if it cannot
    take it."""
    arch = mentor_arch(name, mentor_path(name, path, mentor_dir, ds.name))
    size = (cached or {}).get("resolution") or mentor_input(name, arch, model, None)[
        "resolution"]
    check_resolution(model, name, arch, int(size), device)
    return int(size)


def _load_online(name: str, path: str | None, mentor_dir: str | None, cache: str | None,
                 ds: TrainingData, device: torch.device, cached: dict | None) -> nn.Module:
    """A frozen mentor through the cache's own loader; when it is compared with a cache
    that recorded this mentor, the checkpoint must be the one the cache was built from."""
    p = mentor_path(name, path, mentor_dir, ds.name)
    if not p.is_file():
        raise FileNotFoundError(f"mentor {name!r}: no checkpoint at {p}; train it with "
                                f"`ckd train-mentor --arch {name} --dataset {ds.name}` or "
                                f"pass --mentors {name}=PATH")
    want = (cached or {}).get("checkpoint_sha256")
    if want and file_sha256(p) != want:
        raise ValueError(f"mentor {name!r}: {p} is not the checkpoint the cache {cache} "
                         f"was built from (sha256 {want[:12]}..., recorded as "
                         f"{cached.get('checkpoint')}): pass that checkpoint as "
                         f"--mentors {name}=PATH, or rebuild the mentor's cache with "
                         f"`ckd cache-logits --out {cache} --mentors {name}=PATH "
                         "--overwrite`")
    recorded = str((cached or {}).get("arch") or "")
    if is_named_arch(recorded) and named_arch(p) is None:  # built as the cache built it
        name_mentor_arch(p, recorded)
    meta = read_checkpoint_meta(p)
    if meta.get("dataset") and norm_name(str(meta["dataset"])) != norm_name(ds.name):
        raise ValueError(f"mentor {name!r} ({p}) was trained on {meta['dataset']!r}, not "
                         f"{ds.name!r}: pass the right --mentor-dir or NAME=PATH")
    # the cache's model, layout and input normalisation
    return load_mentor(name, p, ds.num_classes, device, norm=(ds.mean, ds.std))

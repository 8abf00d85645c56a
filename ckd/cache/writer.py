"""`build_cache`: run each frozen mentor once per view slot over the training set and
write the logits into a Zarr v3 store; resumable after kill -9 and sharded over ranks.

Determinism (byte-identical stores whether a run was killed, resumed or sharded): a work
unit (one logits chunk) is always computed with the same batch composition (its
(slot, sample) pairs in slot-major order, cut into `batch_size` pieces), eval mode,
no_grad, and on CUDA deterministic algorithms without cudnn autotuning (`ckd.determinism`:
warn-only by default, strict with `deterministic=True`); units are assigned to ranks
statically (unit u -> rank u % world) so ranks never race on a chunk; the store's
metadata is written whole, in a fixed key order.
Units are computed in order and written by a bounded pool of writer threads (several in
flight, ckd/cache/pipeline.py); each unit's marker is written after its chunks by the same
task, so a kill -9 with writes in flight loses only the units without a marker.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from ckd import determinism
from ckd.data.protocol import TrainingData
from ckd.data.views import IDENTITY_VIEW, apply_views
from ckd.dist import barrier, dist_context, process_group
from ckd.hashing import epoch_seed
from ckd.models import file_sha256
from ckd.models.forward import check_precision, mentor_forward

from .config import CacheConfig
from .features import parse_features, plan_features
from .image_units import image_test_accuracy, image_unit_logits, storage_estimate
from .integrity import marker_columns, mentor_digest, mentor_specs, unit_marker, unit_status
from .layout import (
    CORRECT,
    DEFAULT_CODEC,
    DTYPES,
    MARKER,
    Layout,
    UnitValues,
    layout_from_attrs,
    make_layout,
    read_json_attrs,
    root_attributes,
)
from .location import CacheLocation, CacheRef, cache_location, zarr_store
from .lock import writer_lock
from .mentors import (  # noqa: F401 (resolve_mentors: re-export)
    check_resolution,
    load_mentor,
    mentor_input,
    recorded_precision,
    resolve_mentors,
)
from .pipeline import HostRows, WritePool, default_writers, prefetched
from .plan import plan_build
from .sparse import logits_modes
from .store import check_free_space, check_out_folder, disk_full, prepare_store, space_needed


def mentor_mode(device: torch.device, strict: bool):
    """The mentors' forward passes: deterministic algorithms on CUDA (warn-only unless
    `strict`, i.e. --deterministic). CPU inference kernels already are deterministic
    (checked by the byte-identity tests) and the global switch costs a ~1-2 s import, so
    on CPU it is only flipped when asked for (a nondeterministic op is then refused)."""
    return determinism.deterministic(strict or device.type == "cuda", warn_only=not strict)


# ------------------------------------------------------------------ inference
def _slot_views(keyed_ids: torch.Tensor | None, slots: range, idx: torch.Tensor
                ) -> torch.Tensor:
    """View id of each (slot, sample) pair, [len(slots), len(idx)]."""
    if keyed_ids is None:  # "all": slot j is view j
        return torch.tensor(list(slots), dtype=torch.int64)[:, None].expand(-1, len(idx))
    return keyed_ids[slots.start:slots.stop][:, idx].to(torch.int64)


@torch.no_grad()
def launch_unit(model: torch.nn.Module, images: torch.Tensor, layout: Layout, a: int, b: int,
                keyed_ids: torch.Tensor | None, mean: Sequence[float], std: Sequence[float],
                batch_size: int, progress: tqdm | None = None, features: Sequence[str] = (),
                precision: str = "fp32") -> dict[str, HostRows]:
    """Queue one work unit's forwards: its logits (and requested features) as float32
    host rows [slots_a * samples_b, ...] that `finish_unit` reads once their copies are
    done. Fixed batch composition ((slot, sample) pairs slot-major, cut into `batch_size`
    pieces): deterministic bytes. With features, one forward (`is_feat=True`) gives both;
    its logits equal the plain forward's bit for bit. No host sync per batch."""
    slots, samples = layout.slot_range(a), layout.sample_range(b)
    idx = torch.arange(samples.start, samples.stop)
    dev = images.device
    vids = _slot_views(keyed_ids, slots, idx).reshape(-1).to(dev)
    sidx = idx.repeat(len(slots)).to(dev)
    rows: dict[str, HostRows] = {"logits": HostRows((len(vids), layout.num_classes), dev)}

    def views(s: int) -> torch.Tensor:
        return apply_views(images[sidx[s:s + batch_size]], vids[s:s + batch_size], mean, std)

    for s, x in prefetched(views, range(0, len(vids), batch_size), dev):
        if features:
            stages, z = mentor_forward(model, x, precision, features=True)
            for name, t in zip(("pool", "map"), (stages[-1], stages[-2]), strict=True):
                if name in features:
                    if name not in rows:
                        rows[name] = HostRows((len(vids), *t.shape[1:]), dev)
                    rows[name].put(s, t)
        else:
            z = mentor_forward(model, x, precision)
        rows["logits"].put(s, z)
        if progress is not None:
            progress.update(len(x))
    return {name: r.ready() for name, r in rows.items()}


def finish_unit(rows: dict[str, HostRows], labels: torch.Tensor, layout: Layout, a: int,
                b: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(logits in the store dtype [slots, samples, C], per-slot correct counts, features
    [slots, samples, *shape] in the store dtype) of a launched unit, after its copies."""
    slots, samples = layout.slot_range(a), layout.sample_range(b)
    outputs = {}
    for name, r in rows.items():
        if name == "logits":
            continue
        t = r.wait()
        _check_values(t, samples, f"{name} features")
        outputs[name] = t.reshape(len(slots), len(samples), *t.shape[1:]).numpy().astype(
            layout.dtype)
    logits = rows["logits"].wait().reshape(len(slots), len(samples), -1)
    vals, correct = checked_unit(logits, labels, samples, layout)
    return vals, correct, outputs


def checked_unit(logits: torch.Tensor, labels: torch.Tensor, samples: range, layout: Layout,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits [slots, samples, C] -> (store-dtype values, per-slot correct counts),
    refusing non-finite or fp16-overflowing mentor output."""
    idx = torch.arange(samples.start, samples.stop)
    # Bad mentor output must stop the build, not land in the cache as NaN/inf.
    if not torch.isfinite(logits).all():
        raise FloatingPointError(
            f"the mentor produced non-finite logits (NaN/inf) for samples {samples.start}.."
            f"{samples.stop - 1}: the checkpoint is broken or diverged; retrain or replace it")
    peak = float(logits.abs().max())
    if np.dtype(layout.dtype) == np.float16 and peak > float(np.finfo(np.float16).max):
        raise OverflowError(
            f"the mentor's logits reach |z| = {peak:.3g}, beyond float16's 65504: rebuild "
            "this cache with --dtype fp32 (or check the checkpoint: trained mentors stay far "
            "below this)")
    correct = (logits.argmax(-1) == labels[idx][None]).sum(1).to(torch.int32).numpy()
    return logits.numpy().astype(layout.dtype), correct


def _check_values(t: torch.Tensor, samples: range, what: str) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"the mentor produced non-finite {what} for samples "
                                 f"{samples.start}..{samples.stop - 1}: the checkpoint is "
                                 "broken or diverged; retrain or replace it")


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, images_u8: np.ndarray, labels: np.ndarray,
                  mean: Sequence[float], std: Sequence[float], batch_size: int,
                  device: torch.device,
                  precision: str = "fp32") -> float:
    """Top-1 % on the un-augmented images (IDENTITY_VIEW)."""
    imgs = torch.from_numpy(images_u8)
    correct = 0
    for s in range(0, len(imgs), batch_size):
        x = imgs[s:s + batch_size].to(device)
        ids = torch.full((len(x),), IDENTITY_VIEW, dtype=torch.int64, device=device)
        pred = mentor_forward(model, apply_views(x, ids, mean, std), precision).argmax(-1).cpu()
        correct += int((pred == torch.from_numpy(labels[s:s + batch_size])).sum())
    return round(100.0 * correct / max(1, len(imgs)), 4)


# ------------------------------------------------------------------ entry point
def build_cache(dataset: TrainingData, mentors: Mapping[str, str | Path], out: str | Path,
                config: CacheConfig | None = None, **options: Any) -> Path | str:
    """Cache `mentors` (alias -> checkpoint path) logits for `dataset` (a ckd Dataset, or
    `ImageViews` of a prepared image folder: K rrc views per image, each mentor at its
    resolution, `resolutions` overriding the arch's input size per alias) in
    the Zarr store `out`. Rerunning the same call resumes; new aliases are added; an alias
    whose checkpoint changed is refused unless `overwrite` (which recomputes it; a store
    built for other data is deleted and rebuilt). Under torchrun, ranks share the work.
    `features` ("pool", "pool,map"): also store each mentor's pooled feature / last stage
    map per cached view; added to mentors cached without them by redoing their units.
    `logits`: storage mode 'dense' | 'topk:K' | 'sample:S' for every mentor, or per alias
    (docs/SPARSE.md). `precision`: the mentors' autocast (fp32 | bf16 | fp16), recorded per
    mentor; online training and verify --recompute run the same forward at it.
    `deterministic` (--deterministic): strict deterministic algorithms (`ckd.determinism`),
    recorded per mentor; resuming a mentor with the other setting is refused.
    `batch_size`: images per forward (None: 512 on CPU, on CUDA the most that fits, up to
    2048; `plan.auto_batch_size`). `writers`: writer threads (default
    `pipeline.default_writers()`; 0: every unit written in this thread before the next is
    computed, the sequential reference). The options come as a `CacheConfig` (what `ckd
    cache-logits` passes), as keywords of its fields, or both (keywords win); `device`
    None: `ckd.options.default_device()`, as on the command line.
    """
    cfg = (config or CacheConfig()).replace(**options)
    views, seed, batch_size, dtype, precision = (cfg.views, cfg.seed, cfg.batch_size,
                                                 cfg.dtype, cfg.precision)
    codec, samples_per_chunk, overwrite, progress = (cfg.codec, cfg.samples_per_chunk,
                                                     cfg.overwrite, cfg.progress)
    features, resolutions, logits = cfg.features, cfg.resolutions, cfg.logits
    deterministic, writers, device = cfg.deterministic, cfg.writers, cfg.resolved_device
    num_views = dataset.recipe.num_views
    crops = num_views is None  # continuous views (an image folder's crops): K boxes a sample
    out = cache_location(out)
    out.check_reachable()  # a wrong bucket, credentials or endpoint: say so first
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_precision(precision)
    keyed = not (isinstance(views, str) and views == "all")
    if keyed:
        try:
            k = int(views)
        except ValueError:
            raise ValueError(f"views must be 'all' or a positive int, got {views!r}") from None
        if k < 1:
            raise ValueError(f"views must be 'all' or a positive int, got {views!r}")
        if not crops and k > num_views:
            raise ValueError(f"--views {k} is invalid: must be 'all' or a number of views in "
                             f"[1, {num_views}] (the recipe has {num_views} distinct views)")
    elif crops:
        raise ValueError("an image folder's random-resized-crop views are continuous: pass "
                         "--views K (K views per image, e.g. --views 10)")
    if crops and features:
        raise ValueError("--features is not supported for image folders yet; cache their "
                         "logits without it")
    if not mentors:
        raise ValueError("no mentors given: pass --mentors r110,r8 or alias=path.pt")
    for alias in mentors:
        if not alias or "/" in alias or alias.startswith("."):
            raise ValueError(f"invalid mentor alias {alias!r}: use a plain name like r110")
    paths = {alias: Path(p) for alias, p in mentors.items()}
    for alias, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(
                f"mentor {alias!r}: checkpoint {p} not found. Train one with `ckd train-mentor "
                f"--arch {alias} --dataset {dataset.name}`, or pass a RepDistiller checkpoint "
                f"as {alias}=path.pt")

    n, c = len(dataset.train), int(dataset.num_classes)
    modes = logits_modes(logits, list(paths), c)
    sparse = sorted(a for a, m in modes.items() if m != "dense")
    if features and sparse:  # the feature methods read only dense caches
        given = ", ".join(f"{a}={modes[a]}" for a in sparse)
        raise ValueError(f"--features with sparse --logits ({given}): the feature methods "
                         "read mentor features beside dense logits only; drop --features, "
                         "or cache these mentors with --logits dense")
    num_slots = k if keyed else num_views
    seeds = [epoch_seed(seed, j) for j in range(num_slots)] if keyed else None
    layout = make_layout(num_slots, n, c, keyed=keyed, dtype=DTYPES[dtype],
                         codec=codec or DEFAULT_CODEC,
                         samples_per_chunk=samples_per_chunk)
    idx_all = torch.arange(n)
    # slot j of a keyed cache holds the views of epoch j
    keyed_ids = (torch.stack([dataset.recipe.epoch_view_ids(seed, j, idx_all)
                              for j in range(num_slots)]).to(torch.int16)
                 if keyed and not crops else None)
    attrs = root_attributes(
        dataset_name=dataset.name, fingerprint=dataset.fingerprint, num_samples=n,
        num_test=len(dataset.test), num_classes=c,
        recipe=dataset.recipe.record, keyed=keyed,
        num_slots=num_slots, seeds=seeds, mean=dataset.mean, std=dataset.std, layout=layout,
        params=getattr(dataset, "extra", None))
    mentor_extra = None
    if crops:
        attrs["views"]["seed"] = int(seed)  # rrc_views(seed, i, k) re-derives every box
        res = dict(resolutions or {})

        def mentor_extra(alias: str, arch: str) -> dict[str, Any]:
            return {**mentor_input(alias, arch, None, res.get(alias)), "boxes": True}
    shas = {alias: file_sha256(p) for alias, p in paths.items()}
    rank, world = dist_context()
    feature_names = parse_features(features)
    if rank == 0 and progress and crops:
        print(f"[cache-logits] {out}: {storage_estimate(n, num_slots, c, dtype)}", flush=True)
    feature_shapes = {} if crops else plan_features(
        feature_names, paths, dataset, num_slots, DTYPES[dtype],
        say=print if rank == 0 else (lambda _: None))
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))

    # One writer per store: rank 0 holds the lock for the whole build (ranks of one torchrun
    # job share the work by unit, a second job is refused).
    if rank == 0:
        check_out_folder(out)
    lock = writer_lock(out, "ckd cache-logits") if rank == 0 else contextlib.nullcontext()
    with process_group("gloo"), lock:
        if rank == 0:
            prepare_store(out, attrs, dataset, keyed_ids, layout, paths, shas, overwrite,
                          feature_shapes, mentor_extra, modes, precision, deterministic)
            need = space_needed(out, paths)
            check_free_space(out, need)
        barrier()
        root = zarr.open_group(zarr_store(out), mode="r")
        layout = layout_from_attrs(root.attrs.asdict())  # an existing store's chunking wins
        keyed_ids = (torch.from_numpy(root["view_ids"][:]) if keyed_ids is not None else None)
        images = None if crops else torch.from_numpy(dataset.train.images).to(dev)
        labels = torch.from_numpy(dataset.train.labels)
        models: dict[str, torch.nn.Module] = {}

        def model_of(alias: str) -> torch.nn.Module:  # each mentor loaded once, when needed
            if alias not in models:
                models[alias] = load_mentor(alias, paths[alias], layout.num_classes, dev,
                                            norm=(dataset.mean, dataset.std))
            return models[alias]

        todo = {alias: _todo(out, alias, layout, rank, world) for alias in paths}
        with mentor_mode(dev, deterministic):
            batch_size = plan_build(out, todo, model_of, layout, dataset, images, batch_size,
                                    dev, progress and rank == 0)
            rows = sum(len(layout.slot_range(a)) * len(layout.sample_range(b))
                       for units in todo.values() for a, b in units)
            with tqdm(total=rows, unit="mentor-img", unit_scale=True, dynamic_ncols=True,
                      disable=not progress or rank != 0 or not rows) as bar:
                for alias in paths:
                    bar.set_description(alias + (f" [rank {rank}]" if world > 1 else ""))
                    try:
                        _run_mentor(out, alias, model_of, layout, images, labels, keyed_ids,
                                    dataset, batch_size, dev, todo[alias], bar, seed, writers)
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
                        raise disk_full(out, space_needed(out, paths), err) from err
                    except ArithmeticError as err:  # non-finite or fp16-overflowing output
                        raise type(err)(f"mentor {alias!r} ({paths[alias]}): {err}") from err
            barrier()
            if rank == 0:
                for alias in paths:
                    _finalize_mentor(out, alias, model_of, layout, dataset, batch_size, dev,
                                     deterministic)
                    models.pop(alias, None)
        barrier()
    return out.local if out.local is not None else out.url  # a folder, or the URL


def _todo(out: CacheLocation, alias: str, layout: Layout, rank: int, world: int
          ) -> list[tuple[int, int]]:
    """This rank's units of `alias` still to compute (unit u -> rank u % world)."""
    grp = zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r")
    if grp.attrs.get("complete"):  # prepare_store reopened a complete mentor with holes
        return []
    done = grp[MARKER][:]
    units = [u for i, u in enumerate(layout.units()) if i % world == rank]
    return [(a, b) for a, b in units if (done[a, b] < 0).any()]


class UnitWriter:
    """Writes whole work units of one mentor: every declared array's chunk (computed from
    the logits as stored by its `ArraySpec.compute`), the correct counts, then the marker
    (a crc32c of each) last, so "marker present" means "unit complete"."""

    def __init__(self, out: Path, alias: str, layout: Layout, labels: np.ndarray) -> None:
        grp = zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r+")
        state = grp.attrs.asdict()
        self.complete = bool(state.get("complete"))
        self.layout, self.labels = layout, labels
        self.specs = mentor_specs(state)
        self.features = tuple(state.get("features") or {})
        self.resolution = state.get("resolution")  # image caches: the mentor's input size
        self.precision = recorded_precision(state)
        self.columns = marker_columns(self.specs)
        self.arrays = {s.name: grp[s.name] for s in self.specs}
        self.correct, self.marker = grp[CORRECT], grp[MARKER]

    def write(self, a: int, b: int, vals: np.ndarray, correct: np.ndarray,
              outputs: dict[str, np.ndarray] | None = None) -> None:
        """Unit (a, b): `vals` [slots, samples, C] in the cache dtype, `correct` [slots],
        `outputs` the model's other outputs (features) the declared arrays read."""
        sl, sm = self.layout.slot_range(a), self.layout.sample_range(b)
        unit = UnitValues(vals, self.labels[sm.start:sm.stop], outputs or {})
        named = {s.name: s.compute(unit) for s in self.specs}
        named[CORRECT] = np.asarray(correct, dtype=np.int32)[:, None]
        for name, arr in self.arrays.items():
            arr[sl.start:sl.stop, sm.start:sm.stop] = named[name]
        self.correct[sl.start:sl.stop, b:b + 1] = named[CORRECT]
        self.marker[a:a + 1, b:b + 1] = unit_marker(a, b, named, self.columns)


def _run_mentor(out: CacheLocation, alias: str, model_of: Callable[[str], torch.nn.Module],
                layout: Layout, images: torch.Tensor | None, labels: torch.Tensor,
                keyed_ids: torch.Tensor | None, dataset: TrainingData, batch_size: int,
                dev: torch.device, todo: list[tuple[int, int]], bar: tqdm, seed: int = 0,
                writers: int | None = None) -> None:
    if not todo:
        return
    unit_writer = UnitWriter(out, alias, layout, labels.numpy())
    model = model_of(alias)
    if images is None:  # image folder: a resolution the mentor cannot take, named first
        arch = zarr.open_group(zarr_store(out), path=f"mentors/{alias}").attrs["arch"]
        check_resolution(model, alias, arch, unit_writer.resolution, dev)

    def write(a: int, b: int, rows: dict[str, HostRows], extra: dict[str, Any]) -> None:
        vals, correct, outputs = finish_unit(rows, labels, layout, a, b)  # waits its copies
        unit_writer.write(a, b, vals, correct, {**outputs, **extra})

    # The device queues unit k + 1 while writer threads check, compress and write the
    # units before it (ckd/cache/pipeline.py says what overlaps with what).
    workers = default_writers() if writers is None else writers
    with WritePool(workers) as pool:
        feats = tuple(unit_writer.features)
        for a, b in todo:
            if images is None:  # image folder: decode + crop + resize per unit
                sl, sm = layout.slot_range(a), layout.sample_range(b)
                rows, boxes = image_unit_logits(dataset, model, unit_writer.resolution, seed,
                                                sl, sm, dev, bar, unit_writer.precision)
                pool.submit(write, a, b, {"logits": rows}, {"boxes": boxes})
            else:
                rows = launch_unit(model, images, layout, a, b, keyed_ids, dataset.mean,
                                   dataset.std, batch_size, bar, features=feats,
                                   precision=unit_writer.precision)
                pool.submit(write, a, b, rows, {})


def _finalize_mentor(out: CacheLocation, alias: str, model_of: Callable[[str], torch.nn.Module],
                     layout: Layout, dataset: TrainingData, batch_size: int, dev: torch.device,
                     strict: bool = False) -> None:
    grp = zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r+")
    attrs = grp.attrs.asdict()
    if not attrs.get("complete"):
        marker = grp[MARKER][:]
        undone, holes = unit_status(out, alias, layout, marker, mentor_specs(attrs))
        if undone or holes:
            raise RuntimeError(
                f"mentor {alias!r}: {len(undone) + len(holes)} units still missing after all "
                "ranks finished; rerun the same command to complete them")
        model, precision = model_of(alias), recorded_precision(attrs)
        with mentor_mode(dev, strict):
            if "resolution" in attrs:  # image folder: center crops at the mentor's size
                test_acc = image_test_accuracy(dataset, model, attrs["resolution"], dev,
                                               precision)
            else:
                test_acc = test_accuracy(model, dataset.test.images, dataset.test.labels,
                                         dataset.mean, dataset.std, batch_size, dev,
                                         precision)
        per_view = grp[CORRECT][:].sum(axis=1) / layout.num_samples * 100.0
        keep = ("alias", "arch", "num_classes", "checkpoint", "checkpoint_sha256", "arrays",
                "stat_fields", "features", "resolution", "mean", "std", "boxes", "logits_mode",
                "precision",
                "deterministic", "arch_kwargs")
        grp.attrs.put({**{k: attrs[k] for k in keep if k in attrs}, "test_acc": test_acc,
                       "train_acc": round(float(per_view.mean()), 4),
                       "train_acc_per_view": [round(float(v), 4) for v in per_view],
                       "complete": True})
        record_mentor_digest(out, alias)
    else:  # killed between `complete` and its digest: record it now; never re-bless a
        record_mentor_digest(out, alias, only_if_missing=True)  # digest that differs


def record_mentor_digest(out: CacheRef, alias: str, only_if_missing: bool = False) -> None:
    """Root attributes `digests.mentors[alias]` := the mentor's current digest (last step
    of a build or upgrade, rank 0 only)."""
    root = zarr.open_group(zarr_store(out), mode="r+")
    attrs = read_json_attrs(out, "zarr.json")
    digests = dict(attrs.get("digests") or {})
    mentors = dict(digests.get("mentors") or {})
    if only_if_missing and alias in mentors:
        return
    marker = zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r")[MARKER][:]
    digest = mentor_digest(out, alias, marker)
    if mentors.get(alias) != digest:
        mentors[alias] = digest
        root.attrs.put({**attrs, "digests": {**digests, "mentors": dict(sorted(mentors.items()))}})

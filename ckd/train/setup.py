"""Data and loaders for a run, resolved and checked before the first step (the mentor
sources live in `ckd.train.mentors`). Errors here name the fix."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ckd.train.config import TrainConfig


def load_data(cfg: TrainConfig):
    """The run's `Dataset` (from --prepared betons or by --dataset name)."""
    return open_data(dataset=cfg.dataset, data_dir=cfg.data_dir,
                     dataset_options=cfg.dataset_options, prepared=cfg.prepared,
                     batch_size=cfg.batch_size)


def open_data(*, dataset: str | None, data_dir: str | None = None,
              dataset_options: dict | None = None, prepared: str | None = None,
              batch_size: int = 64):
    """The `Dataset` from a `prepared` folder (betons, or an image folder read in batches
    of `batch_size`), else by `dataset` name with its options."""
    from ckd.data import load_dataset  # noqa: PLC0415

    if prepared is not None:
        from ckd.cache.image_views import ImageViews, is_image_folder  # noqa: PLC0415
        from ckd.data.beton import load_prepared  # noqa: PLC0415

        if is_image_folder(prepared):  # `ckd prepare imagefolder` output
            return ImageViews(prepared, batch_size=batch_size)

        ds = load_prepared(prepared)
        if dataset is not None and norm_name(dataset) != norm_name(ds.name):
            raise ValueError(f"--prepared {prepared} holds dataset {ds.name!r} but "
                             f"--dataset {dataset!r} was given: drop one of them")
        return ds
    return load_dataset(dataset, data_dir, **(dataset_options or {}))


def build_student(cfg: TrainConfig, ds) -> nn.Module:
    """The student (zoo name or module.path:ClassName, with cfg.student_kwargs), refused
    unless it maps the dataset's images to logits [B, num_classes]."""
    from ckd.models.registry import check_logits_shape, create_model  # noqa: PLC0415

    model = create_model(cfg.student, ds.num_classes, **cfg.student_kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"student {cfg.student!r} built a {type(model).__name__}, not an "
                         "nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"student {cfg.student!r} has no trainable parameters: nothing to "
                         "train (a student needs parameters with requires_grad=True)")
    h, w = (student_resolution(cfg),) * 2 if is_image_data(ds) else \
        ds.train.images.shape[1:3]
    check_logits_shape(model, cfg.student, (3, h, w), ds.num_classes)
    return model


def is_image_data(ds) -> bool:
    """A prepared image folder (random-resized-crop views replayed from its cache)."""
    return getattr(ds, "recipe_name", None) == "rrc"


def student_resolution(cfg: TrainConfig) -> int:
    """--resolution, else the student arch's input size (224 for the ImageNet zoo)."""
    if cfg.resolution is not None:
        return int(cfg.resolution)
    from ckd.models.registry import arch_spec, is_import_path  # noqa: PLC0415

    if is_import_path(cfg.student):
        raise ValueError(f"--student {cfg.student} is not a zoo arch: pass --resolution PIXELS "
                         "(its input size on this image folder)")
    return int(arch_spec(cfg.student.split(",")[0]).input_size)


def image_loaders(cfg: TrainConfig, ds, device: torch.device, rank: int, world: int,
                  block: int | None):
    """Train loader replaying the cache's random-resized crops at the student's resolution,
    test loader of center crops (ckd.data.image_train)."""
    from ckd.cache.layout import RRC_RECIPE_NAME, read_root_attrs  # noqa: PLC0415
    from ckd.data.image_train import ImageFolderLoader  # noqa: PLC0415
    from ckd.data.rrc import epoch_slots  # noqa: PLC0415

    if cfg.cache is None or cfg.mentors_online:
        raise ValueError(f"--prepared {cfg.prepared} is an image folder: train from its logit "
                         "cache (--cache, built with `ckd cache-logits --prepared ... --views "
                         "K`); online mentors are not supported on image folders")
    views = read_root_attrs(cfg.cache)["views"]
    if views.get("recipe", {}).get("name") != RRC_RECIPE_NAME:
        raise ValueError(f"--cache {cfg.cache} was not built from an image folder")
    cache_seed, num_slots = int(views["seed"]), int(views["num_slots"])
    size = student_resolution(cfg)
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, drop_last=False, device=str(device),
              rank=rank, world_size=world)
    train = ImageFolderLoader(
        ds, "train", size, shuffle=True, block=block,
        slots_of=lambda e, idx: epoch_slots(cfg.seed, e, idx, num_slots),
        boxes_of=lambda k, idx: ds.boxes(cache_seed, k, idx), **kw)
    test = ImageFolderLoader(ds, "test", size, shuffle=False, **kw)
    return train, test


def norm_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def make_loaders(cfg: TrainConfig, ds, device: torch.device, rank: int, world: int):
    from ckd.data.loaders import make_loader  # noqa: PLC0415

    if cfg.loader == "ffcv":
        src_train = Path(cfg.prepared) / "train.beton"
        src_test = Path(cfg.prepared) / "test.beton"
    else:
        src_train, src_test = ds.train, ds.test
    block = None
    if cfg.order == "shard-blocks":
        if cfg.cache is None:
            raise ValueError("--order shard-blocks visits a logit cache's shards (sample "
                             "chunks) whole: pass --cache, or use --order random")
        from ckd.cache.layout import read_root_attrs  # noqa: PLC0415

        block = int(read_root_attrs(cfg.cache)["layout"]["samples_per_chunk"])
    if is_image_data(ds):
        return image_loaders(cfg, ds, device, rank, world, block)
    train = make_loader(cfg.loader, src_train, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle=True, drop_last=False, device=str(device), rank=rank,
                        world_size=world, block=block)
    test = make_loader(cfg.loader, src_test, batch_size=max(256, cfg.batch_size),
                       seed=cfg.seed, shuffle=False, drop_last=False, device=str(device),
                       rank=rank, world_size=world)
    return train, test

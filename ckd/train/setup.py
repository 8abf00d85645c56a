"""Data and loaders for a run, resolved and checked before the first step (the mentor
sources live in `ckd.train.mentors`). Errors here name the fix."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ckd.cache.layout import read_root_attrs
from ckd.data import load_dataset
from ckd.data.image_train import ImageFolderLoader
from ckd.data.image_views import ImageViews, open_prepared
from ckd.data.loaders import make_loader
from ckd.data.protocol import TrainingData, recipe_for
from ckd.models.registry import arch_spec, check_logits_shape, create_model, is_import_path
from ckd.train.config import TrainConfig


def load_data(cfg: TrainConfig) -> TrainingData:
    """The run's training data (from --prepared or by --dataset name)."""
    return open_data(dataset=cfg.dataset, data_dir=cfg.data_dir,
                     dataset_options=cfg.dataset_options, prepared=cfg.prepared,
                     batch_size=cfg.batch_size)


def open_data(*, dataset: str | None, data_dir: str | None = None,
              dataset_options: dict | None = None, prepared: str | None = None,
              batch_size: int = 64) -> TrainingData:
    """The training data: a `prepared` folder of either kind (an image folder read in
    batches of `batch_size`), else by `dataset` name with its options."""
    if prepared is None:
        return load_dataset(dataset, data_dir, **(dataset_options or {}))
    ds = open_prepared(prepared, batch_size=batch_size)
    if dataset is not None and norm_name(dataset) != norm_name(ds.name):
        raise ValueError(f"--prepared {prepared} holds dataset {ds.name!r} but "
                         f"--dataset {dataset!r} was given: drop one of them")
    return ds


def input_size(cfg: TrainConfig, ds: TrainingData) -> int:
    """The side of the student's input: the stored images', or for views cut at the
    model's resolution (an image folder's crops) the student's resolution."""
    return ds.image_size or student_resolution(cfg)


def build_student(cfg: TrainConfig, ds: TrainingData) -> nn.Module:
    """The student (zoo name or module.path:ClassName, with cfg.student_kwargs), refused
    unless it maps the dataset's images to logits [B, num_classes]."""
    model = create_model(cfg.student, ds.num_classes, **cfg.student_kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"student {cfg.student!r} built a {type(model).__name__}, not an "
                         "nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"student {cfg.student!r} has no trainable parameters: nothing to "
                         "train (a student needs parameters with requires_grad=True)")
    size = input_size(cfg, ds)
    check_logits_shape(model, cfg.student, (3, size, size), ds.num_classes)
    return model


def student_resolution(cfg: TrainConfig) -> int:
    """--resolution, else the student arch's input size (224 for the ImageNet zoo)."""
    if cfg.resolution is not None:
        return int(cfg.resolution)
    if is_import_path(cfg.student):
        raise ValueError(f"--student {cfg.student} is not a zoo arch: pass --resolution PIXELS "
                         "(its input size on this image folder)")
    return int(arch_spec(cfg.student.split(",")[0]).input_size)


def replay_loaders(cfg: TrainConfig, ds: ImageViews, device: torch.device, rank: int,
                   world: int, block: int | None
                   ) -> tuple[ImageFolderLoader, ImageFolderLoader]:
    """Continuous views: the train loader replays the cache's random-resized crops at the
    student's resolution, the test loader gives center crops (ckd.data.image_train)."""
    if cfg.cache is None or cfg.mentors_online:
        raise ValueError(f"--prepared {cfg.prepared} is an image folder: train from its logit "
                         "cache (--cache, built with `ckd cache-logits --prepared ... --views "
                         "K`); online mentors are not supported on image folders")
    views = read_root_attrs(cfg.cache)["views"]
    if recipe_for(views.get("recipe", {})) is not ds.recipe:
        raise ValueError(f"--cache {cfg.cache} was not built from an image folder (its view "
                         f"recipe is {views.get('recipe')}): build one with `ckd cache-logits "
                         f"--prepared {cfg.prepared} --views K`")
    cache_seed, num_slots = int(views["seed"]), int(views["num_slots"])
    size = student_resolution(cfg)
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, drop_last=False, device=str(device),
              rank=rank, world_size=world)
    train = ImageFolderLoader(
        ds, "train", size, shuffle=True, block=block,
        slots_of=lambda e, idx: ds.recipe.epoch_slots(cfg.seed, e, idx, num_slots),
        boxes_of=lambda k, idx: ds.boxes(cache_seed, k, idx), **kw)
    test = ImageFolderLoader(ds, "test", size, shuffle=False, **kw)
    return train, test


def norm_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def make_loaders(cfg: TrainConfig, ds: TrainingData, device: torch.device, rank: int,
                 world: int):
    """Train and test loaders: batches (uint8 images, labels, indices) in the epoch order
    of (cfg.seed, epoch), sharded over `world` ranks."""
    block = None
    if cfg.order == "shard-blocks":
        if cfg.cache is None:
            raise ValueError("--order shard-blocks visits a logit cache's shards (sample "
                             "chunks) whole: pass --cache, or use --order random")
        block = int(read_root_attrs(cfg.cache)["layout"]["samples_per_chunk"])
    if ds.recipe.num_views is None:  # continuous views: replayed from the cache's slots
        return replay_loaders(cfg, ds, device, rank, world, block)
    if cfg.loader == "ffcv":
        src_train = Path(cfg.prepared) / "train.beton"
        src_test = Path(cfg.prepared) / "test.beton"
    else:
        src_train, src_test = ds.train, ds.test
    train = make_loader(cfg.loader, src_train, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle=True, drop_last=False, device=str(device), rank=rank,
                        world_size=world, block=block)
    test = make_loader(cfg.loader, src_test, batch_size=max(256, cfg.batch_size),
                       seed=cfg.seed, shuffle=False, drop_last=False, device=str(device),
                       rank=rank, world_size=world)
    return train, test

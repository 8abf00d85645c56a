"""Data and loaders for a run, resolved and checked before the first step (the mentor
sources live in `ckd.train.mentors`). Errors here name the fix."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ckd.train.config import TrainConfig


def load_data(cfg: TrainConfig):
    """The `Dataset` (from --prepared betons or by --dataset name)."""
    from ckd.data import load_dataset  # noqa: PLC0415

    if cfg.prepared is not None:
        from ckd.data.beton import load_prepared  # noqa: PLC0415

        ds = load_prepared(cfg.prepared)
        if cfg.dataset is not None and norm_name(cfg.dataset) != norm_name(ds.name):
            raise ValueError(f"--prepared {cfg.prepared} holds dataset {ds.name!r} but "
                             f"--dataset {cfg.dataset!r} was given: drop one of them")
        return ds
    return load_dataset(cfg.dataset, cfg.data_dir, **cfg.dataset_options)


def build_student(cfg: TrainConfig, ds) -> nn.Module:
    """The student (zoo name or module.path:ClassName, with cfg.student_kwargs), refused
    unless it maps the dataset's images to logits [B, num_classes]."""
    from ckd.models.registry import check_logits_shape, create_model  # noqa: PLC0415

    model = create_model(cfg.student, ds.num_classes, **cfg.student_kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"student {cfg.student!r} built a {type(model).__name__}, not an "
                         "nn.Module")
    h, w = ds.train.images.shape[1:3]
    check_logits_shape(model, cfg.student, (3, h, w), ds.num_classes)
    return model


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
    train = make_loader(cfg.loader, src_train, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle=True, drop_last=False, device=str(device), rank=rank,
                        world_size=world, block=block)
    test = make_loader(cfg.loader, src_test, batch_size=max(256, cfg.batch_size),
                       seed=cfg.seed, shuffle=False, drop_last=False, device=str(device),
                       rank=rank, world_size=world)
    return train, test

"""Data and loaders for a run, resolved and checked before the first step (the mentor
sources live in `ckd.train.mentors`). Errors here name the fix."""

from __future__ import annotations

from pathlib import Path

import torch

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


def norm_name(name: str) -> str:
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

"""`ckd cache-logits` and `ckd cache info|verify|upgrade` (thin: the logic is in ckd.cache)."""

from __future__ import annotations

from typing import Any

import click

from ckd.cache.config import CacheConfig
from ckd.cli import params
from ckd.cli.train import DATA_FIELDS
from ckd.train.config import TrainConfig


def _load(dataset: str | None, data_dir: str | None, prepared: str | None,
          options: dict[str, Any] | None, batch_size: int = 64) -> Any:
    from ckd.data import load_dataset
    from ckd.data.image_views import open_prepared

    if prepared:  # either kind of `ckd prepare` output
        return open_prepared(prepared, batch_size=batch_size)
    if not dataset:
        raise click.UsageError("give --dataset NAME (or --prepared DIR)")
    return load_dataset(dataset, data_dir, **(options or {}))


@click.command("cache-logits")
@params.config_options(TrainConfig, only=DATA_FIELDS, extra={
    "prepared": {"type": click.Path(exists=True, file_okay=False)}})
@click.option("--mentors", required=True,
              help="Comma list of aliases (r110,r8: checkpoints from --mentor-dir) or "
                   "alias=path.pt (RepDistiller or ckd checkpoint), or alias=RUN_DIR "
                   "(a trained student's `ckd train` folder).")
@click.option("--mentor-dir", default="mentors", show_default=True, type=click.Path(),
              help="Aliases resolve to <mentor-dir>/<dataset>/<arch>.pt.")
@click.option("--out", required=True, type=click.Path(), callback=params.writable_dir,
              help="Cache store (a folder).")
@params.config_options(CacheConfig, extra={"views": {"type": params.Views()},
                                           "device": {"callback": params.device}})
def cache_logits(dataset: str | None, data_dir: str | None, prepared: str | None,
                 dataset_options: tuple[str, ...], mentors: str, mentor_dir: str, out: str,
                 **options: Any) -> None:
    """Run each frozen mentor once per view over the training set into a Zarr cache.

    Resumable (rerun the same command after an interruption), and sharded when launched
    with torchrun. Example: ckd cache-logits --dataset cifar100 --mentors r110,r8 --out
    cache/cifar100
    """
    from ckd.cli.pose import cache_pose, is_pose_dir

    values = params.config_values(CacheConfig, options)
    cfg = CacheConfig(**{k: v for k, v in values.items() if v is not None}).validate()
    if is_pose_dir(prepared):  # a pose set: mentors are pose checkpoints, rows per joint
        if cfg.precision != "fp32" or cfg.deterministic or cfg.features:
            raise ValueError("pose caches are built at --precision fp32, without --features "
                             "or --deterministic: drop those options for a pose set")
        cache_pose(prepared, mentors.split(","), out, cfg.views, cfg.seed,
                   cfg.batch_size or 512, cfg.dtype, cfg.logits, not cfg.progress)
        return
    from ckd.cache import build_cache
    from ckd.cache.mentors import resolve_mentors
    from ckd.cache.sparse import logits_modes, storage_lines
    from ckd.data.views import NUM_VIEWS

    ds = _load(dataset, data_dir, prepared, params.key_values(dataset_options, ("-D",)),
               cfg.batch_size or 512)
    paths = resolve_mentors(mentors, ds.name, mentor_dir)
    unknown = sorted(set(cfg.resolutions) - set(paths))
    if unknown:
        raise ValueError(f"--resolution names {unknown}, not among the mentors "
                         f"{sorted(paths)}")
    modes = logits_modes(cfg.logits, list(paths), ds.num_classes)
    views = cfg.views
    slots = NUM_VIEWS if views == "all" else int(views) if views.isdigit() else 0
    for line in storage_lines(modes, ds.num_classes, slots * len(ds.train),
                              2 if cfg.dtype == "fp16" else 4):
        click.echo(line)
    build_cache(ds, paths, out, cfg)
    _print_info(out)


def _print_info(path: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from ckd.cache.info import info

    attrs, rows = info(path)
    ds = attrs["dataset"]
    t = Table(title=f"{path}: {ds['name']} ({ds['fingerprint']}), {attrs['num_samples']} "
                    f"samples x {attrs['views']['num_slots']} views ({attrs['views']['mode']}), "
                    f"{attrs['num_classes']} classes, {attrs['dtype']}")
    for col in ("mentor", "arch", "precision", "logits", "B/view (x dense)", "test acc %",
                "train acc %",
                "views", "chunks", "size on disk", "ratio", "features"):
        left = col in ("mentor", "arch")
        t.add_column(col, justify="left" if left else "right", no_wrap=left or col == "chunks")
    notes = []
    for r in rows:
        t.add_row(r["alias"], str(r["arch"]), r["precision"], r["logits_mode"],
                  f"{r['bytes_per_view']} ({r['ratio_to_dense']:.3f})",
                  "-" if r["test_acc"] is None else f"{r['test_acc']:.2f}",
                  "-" if r["train_acc"] is None else f"{r['train_acc']:.2f}",
                  str(r["views"]), f"{r['done_chunks']}/{r['total_chunks']}"
                  + ("" if r["complete"] and not r["missing_files"] else " (incomplete)"),
                  f"{r['bytes'] / 2**20:.1f} MiB", f"{r['ratio']:.2f}x",
                  ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["features"].items())
                  + (f" ({r['feature_bytes'] / 2**20:.1f} MiB)" if r["features"] else "-"))
        if r["missing_files"]:
            notes.append(f"{r['alias']}: {r['missing_files']} chunk files missing: rerun the "
                         f"`ckd cache-logits --out {path} ...` command (it rebuilds them)")
        if not r["digest_ok"]:
            notes.append(f"{r['alias']}: metadata differs from its recorded digest: run "
                         f"`ckd cache verify {path}`")
    console = Console()
    if not console.is_terminal:  # piped or captured: do not cut names at 80 columns
        console = Console(width=160)
    console.print(t)
    for note in notes:
        click.echo(note)


@click.group("cache")
def cache_group() -> None:
    """Inspect, verify and upgrade logit caches."""


@cache_group.command("info")
@click.argument("path")
def cache_info(path: str) -> None:
    """Table of the mentors in a cache: arch, accuracy, views, size, compression."""
    _print_info(path)


@cache_group.command("verify")
@click.argument("path")
@click.option("--recompute", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also recompute N random rows per mentor from its checkpoint (logits and "
              "cached features) and compare them with the stored ones.")
@click.option("--data-dir", type=click.Path(), help="Raw dataset folder (for --recompute).")
@click.option("--prepared", type=click.Path(exists=True, file_okay=False),
              help="Prepared dataset folder (for --recompute).")
@click.option("--device", default="cpu", show_default=True, callback=params.device)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which random rows to recompute.")
def cache_verify(path: str, recompute: int, data_dir: str | None, prepared: str | None,
                 device: str, seed: int) -> None:
    """Check completeness (markers and chunk files), every checksum and digest (every
    chunk is read), finite values and the mentor statistics."""
    from ckd.cli.pose import is_pose_dir, verify_pose

    if is_pose_dir(path):
        verify_pose(path, recompute, prepared)
        return
    from ckd.cache.info import verify
    from ckd.cache.layout import read_root_attrs
    from ckd.cache.recompute import load_cache_dataset

    ds = None
    if recompute:
        ds = load_cache_dataset(read_root_attrs(path), data_dir, prepared)
    rep = verify(path, recompute=recompute, dataset=ds, device=device, seed=seed,
                 progress=True)
    click.echo(f"chunks read: {rep.chunks_read}, rows recomputed: {rep.rows_recomputed}"
               + (f" (max |diff| {rep.max_abs_diff:.3g})" if rep.rows_recomputed else ""))
    if not rep.ok:
        for p in rep.problems[:50]:
            click.echo(f"  PROBLEM {p}", err=True)
        raise click.ClickException(f"{path}: {len(rep.problems)} problem(s)")
    click.echo(f"{path}: OK")


@cache_group.command("upgrade")
@click.argument("path")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def cache_upgrade(path: str, quiet: bool) -> None:
    """Convert an older cache store to the current format version, in place.

    Adds checksums to every array, digests of each mentor's metadata and the mentor
    statistics (computed from the stored logits). Resumable: rerun it after an
    interruption. Example: ckd cache upgrade cache/cifar100
    """
    from ckd.cache.upgrade import upgrade

    notes = upgrade(path, progress=not quiet)
    for note in notes:
        click.echo(note)
    click.echo(f"{path}: upgraded; check it with `ckd cache verify {path}`")


@cache_group.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cache_copy(src: str, dst: str, quiet: bool) -> None:
    """Copy a cache store, e.g. from an object store to local disk: SRC and DST are each a
    folder, file:// or s3://BUCKET/PREFIX. Every chunk's crc32c is checked as it is read;
    rerun the same command after an interruption to resume.
    Example: ckd cache copy s3://bucket/caches/cifar100 /nvme/cache/cifar100
    """
    from ckd.cache.copy import copy_cache

    rep = copy_cache(src, dst, progress=not quiet)
    click.echo(f"{dst}: {rep.files} files ({rep.copied} copied now, "
               f"{rep.bytes_copied / 2**20:.1f} MiB), checksums and digests OK")


commands = [cache_logits, cache_group]

"""`ckd cache-logits` and `ckd cache info|verify|upgrade` (thin: the logic is in ckd.cache)."""

from __future__ import annotations

from typing import Any

import click

from ckd.cache.layout import CODECS, DEFAULT_CODEC
from ckd.cli import params


def _dataset_kw(pairs: tuple[str, ...]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {p!r}", param_hint="-D")
        kw[key.strip()] = int(val) if val.strip().lstrip("-").isdigit() else val.strip()
    return kw


def _load(dataset: str | None, data_dir: str | None, prepared: str | None,
          opts: tuple[str, ...], batch_size: int = 64) -> Any:
    from ckd.cache.image_views import ImageViews, is_image_folder
    from ckd.data import load_dataset

    if is_image_folder(prepared):  # `ckd prepare imagefolder|imagenet` output
        return ImageViews(prepared, batch_size=batch_size)
    if prepared:
        from ckd.data import load_prepared

        return load_prepared(prepared)
    if not dataset:
        raise click.UsageError("give --dataset NAME (or --prepared DIR)")
    return load_dataset(dataset, data_dir, **_dataset_kw(opts))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command("cache-logits")
@click.option("--dataset", help="cifar10|cifar100|digits|synthetic (or use --prepared).")
@click.option("--data-dir", type=click.Path(), help="Where the raw dataset lives.")
@click.option("--prepared", type=click.Path(exists=True, file_okay=False),
              help="A folder written by `ckd prepare` (betons + meta.json).")
@click.option("-D", "--dataset-opt", "dataset_opts", multiple=True, metavar="KEY=VALUE",
              help="Dataset option, e.g. -D n_train=512 for synthetic (repeatable).")
@click.option("--mentors", required=True,
              help="Comma list of aliases (r110,r8: checkpoints from --mentor-dir) or "
                   "alias=path.pt (RepDistiller or ckd checkpoint), or alias=RUN_DIR "
                   "(a trained student's `ckd train` folder), or a state_dict with its "
                   "builder: alias=timm:MODEL:FILE, alias=torchvision:ARCH:FILE, "
                   "alias=module.path:Class:FILE (input size and normalisation from the "
                   "model's own config when it has one).")
@click.option("--mentor-dir", default="mentors", show_default=True, type=click.Path(),
              help="Aliases resolve to <mentor-dir>/<dataset>/<arch>.pt.")
@click.option("--out", required=True, type=click.Path(), callback=params.writable_dir,
              help="Cache store (a folder).")
@click.option("--views", default="all", show_default=True, type=params.Views(),
              help="'all' (every distinct view: 162 for CIFAR) or K keyed views per sample.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Augmentation seed (--views K).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Images per mentor forward pass (default: 512 on CPU; on CUDA the most "
                   "that fits in half the device's memory, up to 2048; printed at the start).")
@click.option("--device", default=None, callback=params.device,
              help="cpu|cuda|cuda:N (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), default="fp16",
              show_default=True, help="Storage precision of the logits.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True,
              help="Mentor forward precision (autocast; recorded per mentor: online training "
                   "and `cache verify --recompute` run the mentors at it). fp32 is exact.")
@click.option("--codec", type=click.Choice(list(CODECS)), default=DEFAULT_CODEC,
              show_default=True, help="Compression (new stores only).")
@click.option("--samples-per-chunk", type=click.IntRange(min=1), default=None,
              help="Chunk height (default: ~8 MiB raw chunks; new stores only).")
@click.option("--overwrite", is_flag=True,
              help="Recompute mentors whose checkpoint changed; rebuild a store made for "
                   "other data.")
@click.option("--features", default=None, metavar="pool[,map]",
              help="Also store each mentor's pooled feature (pool) and/or last stage map "
                   "(map) per cached view, for feature methods (crd, fitnet, sdkd, ...). "
                   "Added to an existing cache, only what is missing is computed.")
@click.option("--resolution", "resolutions", multiple=True, metavar="ALIAS=PIXELS",
              help="Image folders: the input size of a mentor (default: its arch's, 224 for "
                   "the ImageNet zoo); repeatable.")
@click.option("--logits", "logits_spec", default="dense", show_default=True,
              help="Storage per mentor: dense | topk:K | sample:S for all, or per alias, "
                   "e.g. r110=dense,r8=sample:16 (docs/SPARSE.md).")
@click.option("--deterministic", is_flag=True,
              help="Strict deterministic algorithms (cuDNN, cuBLAS): an op without a "
                   "deterministic kernel is refused by name instead of warned about; "
                   "recorded per mentor, a resume must match (docs/ARCHITECTURE.md).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def cache_logits(dataset: str | None, data_dir: str | None, prepared: str | None,
                 dataset_opts: tuple[str, ...], mentors: str, mentor_dir: str, out: str,
                 views: str, seed: int, batch_size: int | None, device: str | None, dtype: str,
                 precision: str, codec: str, samples_per_chunk: int | None, overwrite: bool,
                 features: str | None, resolutions: tuple[str, ...], logits_spec: str,
                 deterministic: bool, quiet: bool) -> None:
    """Run each frozen mentor once per view over the training set into a Zarr cache.

    Resumable (rerun the same command after an interruption), and sharded when launched
    with torchrun. Example: ckd cache-logits --dataset cifar100 --mentors r110,r8 --out
    cache/cifar100
    """
    from ckd.cli.pose import cache_pose, is_pose_dir

    if is_pose_dir(prepared):  # a pose set: mentors are pose checkpoints, rows per joint
        if precision != "fp32" or deterministic or features:
            raise ValueError("pose caches are built at --precision fp32, without --features "
                             "or --deterministic: drop those options for a pose set")
        cache_pose(prepared, mentors.split(","), out, views, seed, batch_size or 512, dtype,
                   logits_spec, quiet)
        return
    from ckd.cache import build_cache
    from ckd.cache.mentors import resolve_mentors
    from ckd.cache.sparse import logits_modes, storage_lines
    from ckd.data.views import NUM_VIEWS

    res = {}
    for item in resolutions:
        alias, sep, px = item.partition("=")
        if not sep or not px.strip().isdigit() or int(px) < 1:
            raise click.BadParameter(f"expected ALIAS=PIXELS (e.g. r50=224), got {item!r}",
                                     param_hint="--resolution")
        res[alias.strip()] = int(px)
    ds = _load(dataset, data_dir, prepared, dataset_opts, batch_size or 512)
    paths = resolve_mentors(mentors, ds.name, mentor_dir)
    unknown = sorted(set(res) - set(paths))
    if unknown:
        raise ValueError(f"--resolution names {unknown}, not among the mentors "
                         f"{sorted(paths)}")
    modes = logits_modes(logits_spec, list(paths), ds.num_classes)
    slots = NUM_VIEWS if views == "all" else int(views) if views.isdigit() else 0
    for line in storage_lines(modes, ds.num_classes, slots * len(ds.train),
                              2 if dtype == "fp16" else 4):
        click.echo(line)
    build_cache(ds, paths, out, views=views, seed=seed, batch_size=batch_size,
                device=device or _default_device(), dtype=dtype, precision=precision,
                overwrite=overwrite,
                codec=codec, samples_per_chunk=samples_per_chunk, progress=not quiet,
                features=features, resolutions=res or None, logits=modes,
                deterministic=deterministic)
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
    from ckd.cache.info import load_cache_dataset, verify
    from ckd.cache.layout import read_root_attrs

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

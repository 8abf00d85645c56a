"""`ckd prepare`: write a dataset's FFCV .beton files and fingerprint."""

from __future__ import annotations

import click

from ckd.cli import params

IMAGE_FOLDERS = ("imagefolder", "imagenet")
POSE_SETS = ("coco-keypoints", "synthetic-keypoints")


@click.command()
@click.argument("dataset")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              callback=params.writable_dir,
              help="Directory for train.beton, test.beton and meta.json.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where CIFAR archives are found/downloaded (default $CKD_DATA_DIR or "
                   "./data); for imagefolder/imagenet the folder holding train/ and val/.")
@click.option("--no-download", is_flag=True, help="Never download; fail if the archive is missing.")
@click.option("--n-train", type=int, default=None, help="synthetic only: training samples.")
@click.option("--n-test", type=int, default=None, help="synthetic only: test samples.")
@click.option("--num-classes", type=int, default=None, help="synthetic only: classes.")
@click.option("--seed", type=int, default=None, help="synthetic only: generator seed.")
@click.option("--max-side", type=click.IntRange(min=1), default=512, show_default=True,
              help="imagefolder/imagenet: longer side of the stored JPEGs (larger are shrunk).")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="imagefolder/imagenet: JPEG quality of the stored images.")
@click.option("--resume", is_flag=True,
              help="imagefolder/imagenet: continue an interrupted run (finished parts kept).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="imagefolder/imagenet: decoding processes (default: all cores).")
@click.option("--input-size", default=None,
              help="coco-keypoints/synthetic-keypoints: model input HEIGHTxWIDTH "
                   "(default 64x48).")
def prepare(dataset: str, out: str, data_dir: str | None, no_download: bool,
            n_train: int | None, n_test: int | None, num_classes: int | None,
            seed: int | None, max_side: int, quality: int, resume: bool,
            workers: int | None, input_size: str | None) -> None:
    """Load DATASET (cifar10, cifar100, digits, synthetic, imagefolder, imagenet,
    coco-keypoints, synthetic-keypoints) and write it as .beton files. Example: ckd
    prepare imagenet --data-dir /data/imagenet --out prepared/imagenet"""
    if dataset.lower() in POSE_SETS:
        from ckd.cli.pose import prepare_pose

        prepare_pose(dataset.lower(), data_dir, out, seed, input_size)
        return
    if dataset.lower() in IMAGE_FOLDERS:
        _prepare_images(dataset.lower(), data_dir, out, max_side, quality, resume, workers)
        return
    from ckd.data.beton import write_betons
    from ckd.data.datasets import load_dataset

    kw = {k: v for k, v in dict(n_train=n_train, n_test=n_test, num_classes=num_classes,
                                seed=seed).items() if v is not None}
    ds = load_dataset(dataset, data_dir, download=not no_download, **kw)
    path = write_betons(ds, out)
    click.echo(f"{ds.name}: {len(ds.train)} train + {len(ds.test)} test images, "
               f"{ds.num_classes} classes")
    for name in ("train.beton", "test.beton", "meta.json"):
        click.echo(f"  wrote {path / name}")
    click.echo(f"fingerprint {ds.fingerprint}")


def _prepare_images(kind: str, data_dir: str | None, out: str, max_side: int, quality: int,
                    resume: bool, workers: int | None) -> None:
    from ckd.data.imagefolder import prepare_imagefolder

    if not data_dir:
        raise click.UsageError(f"{kind} needs --data-dir DIR (the folder holding train/ "
                               "and val/)")
    meta = prepare_imagefolder(data_dir, out, imagenet=kind == "imagenet",
                               max_side=max_side, quality=quality, resume=resume,
                               workers=workers)
    click.echo(f"{meta['name']}: {meta['n_train']} train + {meta['n_test']} test images, "
               f"{meta['num_classes']} classes, {meta['num_skipped']} unreadable file(s) "
               f"skipped" + (f" (listed in {out}/skipped.txt)" if meta["num_skipped"] else ""))
    click.echo(f"wrote {out}/train.beton, test.beton, meta.json; fingerprint "
               f"{meta['fingerprint']}")


commands = [prepare]

"""`ckd prepare`: write a dataset's FFCV .beton files and fingerprint."""

from __future__ import annotations

import click


@click.command()
@click.argument("dataset")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Directory for train.beton, test.beton and meta.json.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where CIFAR archives are found/downloaded (default $CKD_DATA_DIR or ./data).")
@click.option("--no-download", is_flag=True, help="Never download; fail if the archive is missing.")
@click.option("--n-train", type=int, default=None, help="synthetic only: training samples.")
@click.option("--n-test", type=int, default=None, help="synthetic only: test samples.")
@click.option("--num-classes", type=int, default=None, help="synthetic only: classes.")
@click.option("--seed", type=int, default=None, help="synthetic only: generator seed.")
def prepare(dataset: str, out: str, data_dir: str | None, no_download: bool,
            n_train: int | None, n_test: int | None, num_classes: int | None,
            seed: int | None) -> None:
    """Load DATASET (cifar10, cifar100, digits, synthetic) and write it as .beton files."""
    from ckd.data.beton import write_betons
    from ckd.data.datasets import load_dataset

    kw = {k: v for k, v in dict(n_train=n_train, n_test=n_test, num_classes=num_classes,
                                seed=seed).items() if v is not None}
    try:
        ds = load_dataset(dataset, data_dir, download=not no_download, **kw)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    path = write_betons(ds, out)
    click.echo(f"{ds.name}: {len(ds.train)} train + {len(ds.test)} test images, "
               f"{ds.num_classes} classes")
    for name in ("train.beton", "test.beton", "meta.json"):
        click.echo(f"  wrote {path / name}")
    click.echo(f"fingerprint {ds.fingerprint}")


commands = [prepare]

"""`ckd models`: list the model zoo (thin wrapper over ckd.models.list_models)."""

import click

from ckd.models import list_models


@click.command("models")
@click.option("--num-classes", type=click.IntRange(min=1), default=100, show_default=True,
              help="Classifier size the parameter counts are computed for.")
def models(num_classes: int) -> None:
    """List architectures, their aliases and parameter counts."""
    rows = list_models(num_classes)
    click.echo(f"{'name':<12}  {'aliases':<26}  {'params':>10}  {'input':>7}  "
               f"(at {num_classes} classes)")
    for r in rows:
        click.echo(f"{r['name']:<12}  {', '.join(r['aliases']):<26}  "
                   f"{r['params'] / 1e6:>9.3f}M  {r['input_size']:>4} px")


commands = [models]

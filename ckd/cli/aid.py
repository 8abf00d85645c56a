"""`ckd adapt-mentor` and `ckd analyze`: thin wrappers over ckd.aid."""

from __future__ import annotations

from typing import Any

import click

from ckd.cli.params import key_values
from ckd.cli.train import data_options

# exit status of adapt-mentor when the adapted mentor lost more than --margin points
MARGIN_EXCEEDED_EXIT = 3


@click.command("adapt-mentor")
@click.option("--arch", help="Mentor architecture (default: what the checkpoint records).")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="The trained mentor to adapt (left untouched).")
@click.option("--student", required=True, help="Student architecture it is adapted for.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Adapted mentor checkpoint, e.g. mentors/cifar100/resnet110-aid-r20.pt.")
@data_options
@click.option("--epochs", type=int, default=10, show_default=True, help="Adaptation epochs.")
@click.option("--warmup-epochs", type=int, help="Proxy-student KD epochs before adapting "
              "(default: --epochs).")
@click.option("--lam", type=float, default=1.0, show_default=True,
              help="Strength of the intra-class adaptation (0: plain fine-tuning).")
@click.option("--anchor", type=float, default=1.0, show_default=True,
              help="Weight keeping the original class-mean soft labels.")
@click.option("--tau", type=float, default=4.0, show_default=True, help="KD temperature T.")
@click.option("--lr", type=float, default=0.005, show_default=True, help="Mentor lr (SGD).")
@click.option("--student-lr", type=float, default=0.05, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--margin", type=float, default=1.0, show_default=True,
              help="Allowed test top-1 drop (points); a larger drop is reported loudly "
              "and the command exits with status 3 (the checkpoint is still written).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def adapt_mentor(dataset_options: tuple[str, ...], tau: float, no_progress: bool,
                 **kw: Any) -> None:
    """Fine-tune a mentor toward an intra-class distribution the student can fit (AID)."""
    from ckd.aid.adapt import adapt_mentor as run  # noqa: PLC0415

    res = run(kw.pop("arch"), kw.pop("checkpoint"), kw.pop("student"), kw.pop("out"),
              dataset_options=key_values(dataset_options, ("--dataset-opt",)), T=tau,
              progress=not no_progress, **kw)
    click.echo(f"adapted mentor {res['out']}: test top-1 {res['source_test_acc']:.2f}% -> "
               f"{res['test_acc']:.2f}% ({-res['accuracy_drop']:+.2f}; margin "
               f"{res['margin']:.2f}{'' if res['within_margin'] else ', EXCEEDED'})")
    if not res["within_margin"]:  # the banner is on stderr; a pipeline must stop here too
        raise SystemExit(MARGIN_EXCEEDED_EXIT)


@click.command("analyze")
@click.option("--cache", required=True, type=click.Path(file_okay=False))
@click.option("--mentor", required=True, help="Mentor alias in the cache.")
@click.option("--student", required=True, type=click.Path(),
              help="A trained student: run folder (its student.pt) or checkpoint file.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@data_options
@click.option("--tau", type=float, default=4.0, show_default=True, help="KD temperature T.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Run seed whose epoch-0 views are used.")
def analyze(cache: str, mentor: str, student: str, out: str, dataset: str | None,
            prepared: str | None, data_dir: str | None, dataset_options: tuple[str, ...],
            tau: float, seed: int) -> None:
    """Split the KD loss (mentor vs student, training set) into inter-class and intra-class
    parts, per class and overall: analysis.md/.csv/.png in --out."""
    from ckd.aid.analyze import (  # noqa: PLC0415
        decompose_over_train,
        load_run_data,
        student_checkpoint,
        write_analysis,
    )
    from ckd.aid.decompose import check_temperature, markdown_table  # noqa: PLC0415
    from ckd.models import load_checkpoint  # noqa: PLC0415

    check_temperature(tau)  # before any data is loaded
    ckpt, run_dir = student_checkpoint(student)
    ds = load_run_data(run_dir, prepared, dataset, key_values(dataset_options, ("--dataset-opt",)),
                       data_dir)
    model = load_checkpoint(ckpt, num_classes=ds.num_classes)
    rows = decompose_over_train(cache, mentor, model, ds, T=tau, seed=seed)
    title = (f"KD loss (T={tau:g}) of mentor {mentor} ({cache}) vs student {student}, "
             f"{ds.name} training set")
    paths = write_analysis(rows, out, title)
    click.echo(markdown_table(rows))
    for p in paths.values():
        click.echo(f"wrote {p}")


commands = [adapt_mentor, analyze]

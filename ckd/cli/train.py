"""`ckd train`, `ckd train-mentor`, `ckd report`: thin wrappers over ckd.train.

The options of `train` and `train-mentor` are generated from `TrainConfig`'s declarations
(`ckd.cli.params.config_options`); each defaults to None so that only flags actually given
override `--config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ckd.cli import params
from ckd.train.config import TrainConfig


class MethodExpr(click.ParamType):
    """--method: a registered method or a weighted sum, checked against the registry."""

    name = "method"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from ckd.methods import method_names  # noqa: PLC0415

        return "[" + "|".join(method_names()) + "|A+W*B]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        from ckd.methods import MethodError, parse_method  # noqa: PLC0415

        try:
            parse_method(value)
        except MethodError as err:
            self.fail(str(err), param, ctx)
        return value


class ParamHelpOption(click.Option):
    """--param, whose help lists every method's parameters from the registry."""

    def get_help_record(self, ctx: click.Context):
        from ckd.methods import all_methods  # noqa: PLC0415

        record = super().get_help_record(ctx)
        if record is None:
            return None
        per = "; ".join(f"{m.name}: {m.param_names()}" for m in all_methods().values()
                        if any(p.cli for p in m.params))
        return record[0], f"{record[1]} Parameters by method: {per}."


# what `ckd train-mentor` has no use for: a mentor is trained from scratch (nokd)
DISTILL_ONLY = ("student", "student_kwargs", "method", "variant", "granularity", "backend",
                "resolution", "cache", "cache_mode", "order", "mentors", "mentors_online",
                "mentor_precision", "mentor_dir", "tau", "beta", "delta", "lam",
                "method_params", "preset", "cuda_graphs")
TRAIN_EXTRA = {"method": {"type": MethodExpr()}, "method_params": {"cls": ParamHelpOption},
               "device": {"callback": params.device}}

# where the images come from: the same options for every command that reads a dataset
DATA_FIELDS = ("dataset", "data_dir", "dataset_options", "prepared")
data_options = params.config_options(TrainConfig, only=DATA_FIELDS)

config_file = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False),
    help="Experiment YAML (keys: the options' names, e.g. batch_size: 128); flags given on "
    "the command line override it.")


def _overrides(kw: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    path = kw.pop("config_path", None)
    return path, params.config_values(TrainConfig, kw)


def _summary(result: dict[str, Any]) -> None:
    if result.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return
    for one in result.get("students", []):  # several students from one pass
        click.echo(f"student {Path(one['run_dir']).name}: best top-1 {one['best_acc']:.2f}%  "
                   f"last top-1 {one['last_acc']:.2f}%  run folder {one['run_dir']}")
    if "students" in result:
        return
    click.echo(f"best top-1 {result['best_acc']:.2f}%  last top-1 {result['last_acc']:.2f}%  "
               f"run folder {result['run_dir']}")


@click.command()
@config_file
@params.config_options(TrainConfig, extra=TRAIN_EXTRA)
def train(**kw: Any) -> None:
    """Train a student from cached (or live) mentor logits."""
    from ckd.train import load_config
    from ckd.train import train as run

    path, kw = _overrides(kw)
    cfg = load_config(path, **kw)
    result = run(cfg)
    _summary(result)


@click.command("train-mentor")
@click.option("--arch", required=True, help="Mentor architecture, e.g. r110, resnet56, vgg13.")
@click.option("--mentor-dir", type=click.Path(file_okay=False), callback=params.writable_dir,
              help="Writes <mentor-dir>/<dataset>/<arch>.pt (default ./mentors).")
@config_file
@params.config_options(TrainConfig, exclude=DISTILL_ONLY, extra=TRAIN_EXTRA)
def train_mentor(arch: str, mentor_dir: str | None, **kw: Any) -> None:
    """Train a mentor from scratch (nokd) and save ./mentors/<dataset>/<ARCH>.pt."""
    from ckd.train import load_config
    from ckd.train import train_mentor as run

    path, kw = _overrides(kw)
    base = load_config(path, **kw).to_dict() if path else {
        k: v for k, v in kw.items() if v is not None}
    dataset = base.pop("dataset", None)
    out = base.pop("out", None)
    for k in ("student", "method", "cache", "mentors", "mentors_online"):
        base.pop(k, None)
    result = run(arch, dataset, out=out, mentor_dir=mentor_dir, **base)
    _summary(result)
    if result.get("rank", 0) == 0:
        click.echo(f"mentor checkpoint {result['mentor_path']}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="report", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the PNGs and report.md.")
def report(run_dirs: tuple[str, ...], out: str) -> None:
    """Plots (accuracy, mentor ranks, temperatures) and a best/last top-1 table for runs."""
    from ckd.train.report import summary_table, write_report

    written = write_report(list(run_dirs), out)
    from ckd.train.report import load_run

    click.echo(summary_table([load_run(d) for d in run_dirs]))
    for path in written.values():
        click.echo(f"wrote {path}")


commands = [train, train_mentor, report]

"""`ckd train`, `ckd train-mentor`, `ckd report`: thin wrappers over ckd.train.

Every option defaults to None so that only flags actually given override `--config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from ckd.cli import params


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


def _kv(pairs: tuple[str, ...], flag: str) -> dict[str, Any] | None:
    if not pairs:
        return None
    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{p!r}: expected KEY=VALUE", param_hint=flag)
        out[key.strip()] = yaml.safe_load(val)
    return out


def _common(f):
    """Options shared by train and train-mentor (data, optimisation, run)."""
    opts = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="Experiment YAML; flags given on the command line override it."),
        click.option("--dataset", help="cifar10 | cifar100 | digits | synthetic."),
        click.option("--data-dir", help="Where CIFAR archives live (default ./data)."),
        click.option("-D", "--dataset-opt", "dataset_opt", multiple=True,
                     help="Dataset option KEY=VALUE (synthetic: n_train, n_test, ...)."),
        click.option("--prepared", type=click.Path(file_okay=False),
                     help="Beton folder written by `ckd prepare` (instead of --dataset)."),
        click.option("--loader", type=click.Choice(["memory", "ffcv"])),
        click.option("--epochs", type=int, help="Default 240."),
        click.option("--batch-size", type=int, help="Default 64."),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]),
                     help="Default: sgd, adamw for the ViT/Mamba students."),
        click.option("--lr", type=float,
                     help="Default 0.05 (0.01 for MobileNetV2/ShuffleNet students; 1e-3 "
                     "with adamw)."),
        click.option("--momentum", type=float),
        click.option("--weight-decay", type=float),
        click.option("--schedule", type=click.Choice(["step", "classroom-warmup", "constant",
                                                      "cosine"]),
                     help="cosine: linear warm-up over --warmup-epochs (default 0), then "
                     "cosine to 0 (the ImageNet recipe)."),
        click.option("--label-smoothing", type=float,
                     help="Label smoothing of the cross-entropy, in [0, 1) (supervised: "
                     "--method nokd, train-mentor; default 0)."),
        click.option("--decay-norm-bias/--no-decay-norm-bias", default=None,
                     help="Weight decay on biases and normalisation weights too (default "
                     "on; off: the ImageNet recipe's exclusions)."),
        click.option("--milestones", help="Comma list, e.g. 150,180,210 (default: those "
                     "scaled to --epochs)."),
        click.option("--warmup-epochs", type=int, help="classroom-warmup (default 120/240) "
                     "or cosine (default 0)."),
        click.option("--seed", type=int),
        click.option("--out", type=click.Path(file_okay=False), help="Run folder."),
        click.option("--resume", is_flag=True, default=None,
                     help="Continue the run in --out from its last checkpoint (same "
                     "settings only)."),
        click.option("--resume-allow", help="With --resume: settings that may differ from "
                     "the checkpoint's, comma list (e.g. epochs,lr); recorded in "
                     "metrics.jsonl."),
        click.option("--overwrite", is_flag=True, default=None,
                     help="Start over in an --out that holds a run (its checkpoint, metrics "
                     "and weights are replaced; mentors: replace the mentor checkpoint)."),
        click.option("--device", help="cpu | cuda | cuda:N (default cuda if available)."),
        click.option("--amp/--no-amp", default=None, help="bf16 autocast on CUDA (default on)."),
        click.option("--deterministic/--no-deterministic", default=None,
                     help="Deterministic algorithms (cuDNN, cuBLAS; an op without a "
                     "deterministic kernel is refused by name): bit-for-bit GPU runs "
                     "(docs/ARCHITECTURE.md). Default off; recorded, a --resume must match."),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="channels_last memory format (default on)."),
        click.option("--compile", "compile_", is_flag=True, default=None,
                     help="torch.compile the student."),
        click.option("--log-every", type=int, help="Steps between metrics records (50)."),
        click.option("--max-steps-per-epoch", type=int, help="Truncate epochs (smoke tests)."),
        click.option("--no-progress", is_flag=True, default=None, help="No progress bars."),
        click.option("--tensorboard", type=click.Path(file_okay=False),
                     help="TensorBoard folder (default off): loss terms, accuracies, lr, "
                     "mentor ranks and temperatures, step time and mentor histograms in "
                     "<folder>/<run name>; metrics.jsonl is written as always."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _overrides(kw: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    path = kw.pop("config_path", None)
    kw["dataset_options"] = _kv(kw.pop("dataset_opt", ()), "--dataset-opt")
    if "student_kwarg" in kw:
        kw["student_kwargs"] = _kv(kw.pop("student_kwarg", ()), "--student-kwargs")
    if "param" in kw:
        kw["method_params"] = _kv(kw.pop("param", ()), "--param")
    kw["compile"] = kw.pop("compile_", None)
    kw["progress"] = False if kw.pop("no_progress", None) else None
    return path, kw


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
@_common
@click.option("--cache", type=click.Path(file_okay=False), help="Logit cache (ckd cache-logits).")
@click.option("--cache-mode", type=click.Choice(["memory", "stream", "blocks"]),
              help="memory (default: the whole cache decompressed once), stream (one "
              "epoch's rows, read ahead), blocks (a window of whole chunks read when a step "
              "needs them: use with --order shard-blocks).")
@click.option("--resolution", type=click.IntRange(min=1),
              help="Image folders: the student's input size in pixels (default: its "
              "arch's, 224 for the ImageNet zoo); crops replay the cached views' boxes.")
@click.option("--order", type=click.Choice(["random", "shard-blocks"]),
              help="Epoch order: random (default) or shard-blocks (whole cache shards in a "
              "random order: each shard read once per epoch; a pure function of seed and "
              "epoch, the same for any number of ranks).")
@click.option("--student", help="Student: a zoo name (`ckd models`, default resnet20) or "
              "module.path:ClassName of any nn.Module mapping images to logits [B, C]; "
              "several, comma-separated (r8,r14,wrn_16_1), train side by side from one pass "
              "over the data and cache, each in <out>/<student>.")
@click.option("--student-kwargs", "student_kwarg", multiple=True,
              help="Student constructor keyword KEY=VALUE (repeatable), e.g. depth=6.")
@click.option("--method", type=MethodExpr(),
              help="A method or a weighted sum (kd+0.5*OTHER); `ckd methods` lists them "
              "with their parameters. Default classroom.")
@click.option("--variant", help="classroom: paper | official.")
@click.option("--granularity", help="classroom: batch | sample.")
@click.option("--backend", type=click.Choice(["auto", "triton", "reference"]))
@click.option("--mentors", help="Comma list, teacher first: a subset of the cached mentors, "
              "or with --mentors-online NAME, NAME=checkpoint.pt, NAME=timm:MODEL:FILE, "
              "NAME=torchvision:ARCH:FILE or NAME=module.path:Class:FILE.")
@click.option("--mentors-online/--no-mentors-online", default=None,
              help="Run the mentors' checkpoints live on the same views (no cache).")
@click.option("--mentor-precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Online mentors' forward precision, as `ckd cache-logits --precision` "
              "(default: the --cache's recorded one, else bf16 with --amp on CUDA, else "
              "fp32); must match a --cache's.")
@click.option("--mentor-dir", type=click.Path(file_okay=False),
              help="Online mentors: NAME is <mentor-dir>/<dataset>/<arch>.pt (default "
              "./mentors), as in `ckd cache-logits`.")
@click.option("--tau", type=float, help="The method's temperature parameter (tau or T).")
@click.option("--beta", type=float, help="classroom: weight of the mentoring terms.")
@click.option("--delta", type=float, help="classroom: weight of the extra CE + teacher KL.")
@click.option("--lam", type=float, help="classroom: rank scale lambda.")
@click.option("--param", multiple=True, metavar="KEY=VALUE", cls=ParamHelpOption,
              help="A method parameter (METHOD.KEY=VALUE in a sum).")
@click.option("--preset", help="A named parameter set of the method, e.g. repdistiller for "
              "kd (0.1 CE + 0.9 KD); `ckd methods` lists them.")
@click.option("--cuda-graphs", is_flag=True, default=None,
              help="Replay each full batch's training step (forward, fused loss, backward, "
              "SGD) from a CUDA graph captured after warm-up; the last partial batch and "
              "evaluation run eagerly. CUDA, SGD, logit methods, one process.")
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
@click.option("--resolution", type=click.IntRange(min=1),
              help="Image folders: the input size in pixels (default: the arch's, 224 for "
              "the ImageNet zoo); keyed random-resized crops + flips for training, the "
              "center crop for evaluation.")
@click.option("--mentor-dir", type=click.Path(file_okay=False), callback=params.writable_dir,
              help="Writes <mentor-dir>/<dataset>/<arch>.pt (default ./mentors).")
@_common
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


@click.command("eval")
@click.argument("checkpoint")
@click.option("--prepared", type=click.Path(exists=True, file_okay=False),
              help="A folder written by `ckd prepare` (image folder or CIFAR-style).")
@click.option("--dataset", help="A bundled set instead: cifar10 | cifar100 | digits | "
              "synthetic.")
@click.option("--data-dir", help="Where the bundled set's archives live (default ./data).")
@click.option("--split", default="val", show_default=True,
              help="val (an image folder's val/ folder; CIFAR: its test set) or train.")
@click.option("--resolution", type=click.IntRange(min=1),
              help="Image folders: the input size (default: the model's own config, else "
              "its zoo arch's); center crop of 224/256 of the short side, resized to it.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None, callback=params.device,
              help="cpu | cuda | cuda:N (default cuda when available).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="Forward precision (autocast).")
@click.option("--out", "out", default="eval.jsonl", show_default=True,
              type=click.Path(dir_okay=False), help="JSON lines file the result is "
              "appended to.")
def evaluate(checkpoint: str, prepared: str | None, dataset: str | None,
             data_dir: str | None, split: str, resolution: int | None, batch_size: int,
             device: str | None, precision: str, out: str) -> None:
    """Top-1/top-5 accuracy and loss of CHECKPOINT on a split.

    CHECKPOINT is a ckd or RepDistiller checkpoint, a `ckd train` run folder, or a
    state_dict with its builder: timm:MODEL:FILE, torchvision:ARCH:FILE,
    module.path:Class:FILE."""
    import json

    import torch

    from ckd.train.evaluate import append_jsonl, evaluate_checkpoint

    if not prepared and not dataset:
        raise click.UsageError("give --prepared DIR (or --dataset NAME)")
    rec = evaluate_checkpoint(checkpoint, prepared=prepared, dataset=dataset,
                              data_dir=data_dir, split=split, resolution=resolution,
                              batch_size=batch_size, precision=precision,
                              device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    top = next(k for k in rec if k.startswith("top") and k != "top1")
    click.echo(f"{rec['arch']} on {rec['data']} {rec['split']} ({rec['images']} images, "
               f"{rec['resolution']} px): top-1 {rec['top1']:.2f}%  {top} {rec[top]:.2f}%  "
               f"loss {rec['loss']:.4f}")
    click.echo(json.dumps(rec, sort_keys=True))
    click.echo(f"appended to {append_jsonl(out, rec)}")


commands = [train, train_mentor, report, evaluate]

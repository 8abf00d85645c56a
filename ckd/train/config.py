"""Training configuration: one dataclass, loaded from YAML, overridden by flags, saved resolved.

Precedence: dataclass defaults < `--config exp.yaml` < command-line flags (click options
default to None so an unset flag never overrides the file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ckd.atomic import atomic_write_text
from ckd.data.datasets import dataset_options
from ckd.methods import LossPlan, make_plan
from ckd.models.registry import canonical_arch, default_optimizer
from ckd.options import (
    OptionError,
    check_device,
    check_existing_dir,
    check_fields,
    check_triton_backend,
    check_writable_dir,
    default_device,
    option,
)
from ckd.train.tensorboard import summary_writer_class

# Students trained at lr 0.01 in the paper (MobileNet/ShuffleNet), canonical names.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

KV = "KEY=VALUE"  # the placeholder of a repeatable mapping option


@dataclass
class TrainConfig:
    """Every field is declared once (`option`: type, range, choices, default, help); the
    `ckd train` options are generated from these declarations (`ckd.cli.params`)."""

    # what to train
    student: str = option(
        "resnet20", str, "the student: a zoo name (`ckd models`) or module.path:ClassName of "
        "any nn.Module mapping images to logits [B, C]", details="Several, comma-separated "
        "(r8,r14,wrn_16_1), train side by side from one pass over the data and cache, each "
        "in <out>/<student>.")
    student_kwargs: dict[str, Any] = option(
        {}, dict, "student constructor keywords", metavar=KV,
        details="KEY=VALUE, repeatable, e.g. depth=6.")
    method: str = option(
        "classroom", str, "a registered method or a weighted sum (kd+0.5*OTHER)",
        details="`ckd methods` lists them with their parameters.")
    variant: str | None = option(None, str, "classroom: paper | official",
                                 details="Default: the method's.")
    granularity: str | None = option(None, str, "classroom: batch | sample",
                                     details="Default: the method's.")
    backend: str = option("auto", str, "distill_loss backend",
                          choices=("auto", "triton", "reference"),
                          details="auto: the Triton kernels on CUDA, else the reference.")
    # data
    dataset: str | None = option(None, str, "cifar10 | cifar100 | digits | synthetic",
                                 details="Or --prepared.")
    data_dir: str | None = option(None, str, "where the raw dataset lives", metavar="DIR",
                                  details="Default: ./data.")
    dataset_options: dict[str, Any] = option(
        {}, dict, "dataset options", flags=("-D", "--dataset-opt"), metavar=KV,
        details="KEY=VALUE, repeatable (synthetic: n_train, n_test, num_classes, seed).")
    prepared: str | None = option(None, str, "a folder written by `ckd prepare` (instead of "
                                  "--dataset)", metavar="DIR")
    loader: str = option("memory", str, "data loader", choices=("memory", "ffcv"),
                         details="ffcv reads --prepared beton files.")
    resolution: int | None = option(
        None, int, "image folders: the trained model's input size in pixels", low=1,
        optional=True, details="Default: its arch's, 224 for the ImageNet zoo. Training crops "
        "are keyed random-resized crops + flips (a cache's replayed boxes), evaluation the "
        "center crop.")
    # mentors
    cache: str | None = option(None, str, "logit cache (`ckd cache-logits`)", metavar="DIR")
    cache_mode: str = option(
        "memory", str, "where cached logits live while training",
        choices=("memory", "stream", "blocks"),
        details="memory: the whole cache decompressed once; stream: one epoch's rows, read "
        "ahead; blocks: a window of whole chunks read when a step needs them (use with "
        "--order shard-blocks).")
    order: str = option(
        "random", str, "epoch order: a random permutation, or whole cache shards (sample "
        "chunks) in a random order", choices=("random", "shard-blocks"),
        details="shard-blocks reads each shard once per epoch; either is a pure function "
        "of seed and epoch, the same for any number of ranks.")
    mentors: list[str] | None = option(
        None, list, "comma list, teacher first: a subset of the cached mentors, or with "
        "--mentors-online NAME or NAME=checkpoint.pt")
    mentors_online: bool = option(False, bool, "run the mentors' checkpoints live on the "
                                  "same views (no cache)")
    mentor_precision: str | None = option(
        None, str, "online mentors' forward precision (autocast), as `ckd cache-logits "
        "--precision`", choices=("fp32", "bf16", "fp16"), optional=True,
        details="Default: a --cache's recorded one, else bf16 with --amp on CUDA, else fp32. "
        "Must match a --cache's.")
    mentor_dir: str | None = option(
        None, str, "online mentors: NAME is <mentor-dir>/<dataset>/<arch>.pt, as in `ckd "
        "cache-logits`", metavar="DIR", details="Default: ./mentors.")
    # loss hyper-parameters (None: the method's declared default, lam None: number of
    # mentors); tau sets the method's temperature (tau or T), method_params any parameter
    tau: float | None = option(None, float, "the method's temperature parameter (tau or T)")
    beta: float | None = option(None, float, "classroom: weight of the mentoring terms")
    delta: float | None = option(None, float, "classroom: weight of the extra CE + teacher KL")
    lam: float | None = option(None, float, "classroom: rank scale lambda",
                               details="Default: the number of mentors.")
    method_params: dict[str, Any] = option(
        {}, dict, "method parameters", flags=("--param",), metavar=KV,
        details="KEY=VALUE, repeatable; METHOD.KEY=VALUE in a sum.")
    preset: str | None = option(
        None, str, "a named parameter set of the method, e.g. repdistiller for kd (0.1 CE + "
        "0.9 KD)", details="`ckd methods` lists them.")
    # optimisation
    epochs: int = option(240, int, "training epochs", low=1)
    batch_size: int = option(64, int, "samples per step and process", low=1)
    optimizer: str | None = option(None, str, "optimizer", choices=("sgd", "adamw"),
                                   optional=True, details="Default: sgd, adamw for the "
                                   "ViT/Mamba students.")
    lr: float | None = option(None, float, "base learning rate", low=0, low_open=True,
                              optional=True, details="Default: 0.05 (0.01 for "
                              "MobileNetV2/ShuffleNet students; 1e-3 with adamw).")
    momentum: float = option(0.9, float, "SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = option(5e-4, float, "SGD weight decay", low=0)
    schedule: str = option("step", str, "learning-rate schedule",
                           choices=("step", "classroom-warmup", "constant", "cosine"),
                           details="cosine: linear warm-up over --warmup-epochs (default 0), "
                           "then cosine to 0 (the ImageNet recipe).")
    milestones: list[int] | None = option(
        None, list, "comma list of epochs where the learning rate drops, e.g. 150,180,210",
        details="Default: those scaled to --epochs.")
    gamma: float = option(0.1, float, "learning-rate factor at each milestone", low=0,
                          low_open=True, high=1)
    warmup_epochs: int | None = option(None, int, "warm-up epochs of classroom-warmup or "
                                       "cosine", low=1, optional=True,
                                       details="Default: 120 scaled to --epochs "
                                       "(classroom-warmup), 0 (cosine).")
    warmup_end_lr: float = option(0.01, float, "learning rate at the end of the warm-up",
                                  low=0, low_open=True)
    # the ImageNet recipe's knobs (supervised mentors: `ckd train-mentor`)
    label_smoothing: float = option(0.0, float, "label smoothing of the cross-entropy "
                                    "(--method nokd, train-mentor)", low=0.0, high=1.0,
                                    high_open=True)
    decay_norm_bias: bool = option(True, bool, "weight decay on biases and normalisation "
                                   "weights too", details="Off: only on weight matrices and "
                                   "kernels (the ImageNet recipe's exclusions).")
    seed: int = option(0, int, "seed of the views, the order and the initial weights", low=0)
    # run
    out: str | None = option(None, str, "run folder", metavar="DIR",
                             details="Default: runs/<dataset>-<student>-<method>.")
    resume: bool = option(False, bool, "continue the run in --out from its last checkpoint "
                          "(same settings only)")
    resume_allow: list[str] | None = option(
        None, list, "with --resume: settings that may differ from the checkpoint's, comma "
        "list (e.g. epochs,lr); recorded in metrics.jsonl")
    overwrite: bool = option(False, bool, "start over in an --out that holds a run (its "
                             "checkpoint, metrics and weights are replaced; train-mentor: "
                             "replace the mentor checkpoint)")
    device: str | None = option(None, str, "cpu | cuda | cuda:N",
                                details="Default: cuda if available.")
    amp: bool = option(True, bool, "bf16 autocast (CUDA only)")
    # bit-for-bit GPU runs (ckd.determinism); online mentors then run as the cache's: fp32
    deterministic: bool = option(
        False, bool, "deterministic algorithms (cuDNN, cuBLAS)",
        details="An op without a deterministic kernel is refused by name: bit-for-bit GPU "
        "runs (docs/ARCHITECTURE.md). Recorded, a --resume must match.")
    # the student (CPU and CUDA); online mentors follow `ckd cache-logits` (load_mentor)
    channels_last: bool = option(True, bool, "channels_last memory format")
    compile: bool = option(False, bool, "torch.compile the student")
    cuda_graphs: bool = option(
        False, bool, "replay the training step from a CUDA graph",
        details="Each full batch's step (forward, fused loss, backward, SGD) is captured "
        "after warm-up; the last partial batch and evaluation run eagerly. CUDA, SGD, logit "
        "methods, one process.")
    log_every: int = option(50, int, "steps between metrics records", low=1)
    max_steps_per_epoch: int | None = option(None, int, "truncate epochs (tests, benchmarks)",
                                             low=1, optional=True)
    progress: bool = option(True, bool, "progress bars")
    tensorboard: str | None = option(
        None, str, "TensorBoard folder (default off)", metavar="DIR", optional=True,
        details="Each run's scalars (loss terms, accuracies, lr, mentor ranks and "
        "temperatures, step time) and mentor histograms in <folder>/<run name>, beside "
        "metrics.jsonl.")
    eval_every: int = option(1, int, "epochs between test evaluations", low=1)

    def resolved_optimizer(self) -> str:
        return self.optimizer or default_optimizer(self.student)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        if self.resolved_optimizer() == "adamw":
            return 1e-3
        return 0.01 if canonical_arch(self.student) in LOW_LR_STUDENTS else 0.05

    def loss_plan(self) -> LossPlan:
        """The run's loss, every method parameter resolved and checked (ckd.methods)."""
        shortcuts = dict(tau=self.tau, beta=self.beta, delta=self.delta, lam=self.lam,
                         variant=self.variant, granularity=self.granularity)
        return make_plan(self.method, self.method_params, self.preset, shortcuts,
                         backend=self.backend)

    def validate(self) -> None:
        """Every value against its declaration, then the cross-field rules: before any
        work starts, each error naming the option, the value and the valid range."""
        check_fields(self)
        self.loss_plan()
        self._check_schedule()
        if self.dataset is not None:
            dataset_options(self.dataset, self.dataset_options)
        check_existing_dir(self.prepared, "--prepared", "write it with `ckd prepare`")
        check_existing_dir(self.cache, "--cache", "build it with `ckd cache-logits`")
        check_writable_dir(self.out, "--out")
        if self.tensorboard is not None:
            check_writable_dir(self.tensorboard, "--tensorboard")
            summary_writer_class()  # a missing package: one line, before any work
        check_device(self.device)
        check_triton_backend(self.backend, self.device)
        if self.cuda_graphs:
            self._check_cuda_graphs()
        if self.dataset is None and self.prepared is None:
            raise ValueError("no data: pass --dataset NAME (with --data-dir) or "
                             "--prepared DIR (from `ckd prepare`)")
        if self.loader == "ffcv" and self.prepared is None:
            raise ValueError("--loader ffcv reads beton files: pass --prepared DIR "
                             "(write it with `ckd prepare`)")

    def _check_cuda_graphs(self) -> None:
        device = self.device or default_device()
        if self.label_smoothing:
            raise OptionError("--cuda-graphs does not apply --label-smoothing: drop one of "
                              "them")
        if not device.startswith("cuda"):
            raise OptionError(f"--cuda-graphs needs a CUDA device (this run is on {device}); "
                              "drop --cuda-graphs")
        if self.compile:
            raise OptionError("--cuda-graphs and --compile both capture the step: drop one")
        if self.backend == "reference":
            raise OptionError("--cuda-graphs captures the fused Triton loss: drop --backend "
                              "reference, or drop --cuda-graphs")
        if self.resolved_optimizer() != "sgd":
            raise OptionError("--cuda-graphs captures SGD steps only: use --optimizer sgd, "
                              "or drop --cuda-graphs")

    def _check_schedule(self) -> None:
        uses_milestones = self.schedule in ("step", "classroom-warmup")
        if self.milestones is not None and uses_milestones:
            ms = self.milestones
            if not all(isinstance(m, int) and not isinstance(m, bool) for m in ms) or \
                    any(b <= a for a, b in zip(ms, ms[1:], strict=False)) or \
                    (ms and not 1 <= ms[0] <= ms[-1] <= self.epochs):
                # a milestone at --epochs itself is allowed: a first part of a longer
                # schedule, continued with --resume --resume-allow epochs
                raise OptionError(f"--milestones={ms} is invalid: must be increasing integer "
                                  f"epochs in [1, {self.epochs}] (--epochs {self.epochs})")
        if self.label_smoothing and self.method != "nokd":
            raise OptionError(f"--label-smoothing {self.label_smoothing} applies to supervised "
                              "training (--method nokd, `ckd train-mentor`): drop it for "
                              f"--method {self.method}")
        if self.schedule in ("classroom-warmup", "cosine") and self.warmup_epochs is not None \
                and self.warmup_epochs >= self.epochs:
            raise OptionError(f"--warmup-epochs={self.warmup_epochs} is invalid: the warm-up "
                              f"must end before training does (< --epochs {self.epochs})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _coerce_keys(d: dict[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = k.replace("-", "_")
        if key not in FIELDS:
            raise ValueError(f"{source}: unknown setting {k!r}; valid ones: "
                             f"{', '.join(sorted(FIELDS))}")
        out[key] = v
    return out


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < YAML file < overrides (keys whose value is None are ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--config {p}: no such file")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config {p}: expected a mapping of setting: value")
        values.update(_coerce_keys(data, str(p)))
    values.update(_coerce_keys({k: v for k, v in overrides.items() if v is not None},
                               "override"))
    for key in ("mentors", "milestones", "resume_allow"):
        if isinstance(values.get(key), str):  # "a,b,c" from a flag or the file
            parts = [s.strip() for s in values[key].split(",") if s.strip()]
            values[key] = _ints(parts, values[key]) if key == "milestones" else parts
    if isinstance(values.get("milestones"), int):
        values["milestones"] = [values["milestones"]]
    for key in ("method_params", "dataset_options", "student_kwargs"):
        if values.get(key) is not None and not isinstance(values[key], dict):
            raise ValueError(f"{key} must be a mapping, got {values[key]!r}")
    return TrainConfig(**values)


def _ints(parts: list[str], text: str) -> list[int]:
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise OptionError(f"--milestones={text!r} is invalid: must be a comma list of "
                          "integer epochs, e.g. 150,180,210") from None


def as_config(config: TrainConfig | dict[str, Any] | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return load_config(None, **config)
    return load_config(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

"""Training configuration: one dataclass, loaded from YAML, overridden by flags, saved resolved.

Precedence: dataclass defaults < `--config exp.yaml` < command-line flags (click options
default to None so an unset flag never overrides the file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ckd.atomic import atomic_write_text
from ckd.methods import LossPlan, make_plan
from ckd.options import (
    OptionError,
    Param,
    check_device,
    check_existing_dir,
    check_triton_backend,
    check_writable_dir,
)

# Students trained at lr 0.01 in the paper (MobileNet/ShuffleNet), canonical names.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def _opt(default: Any, type_: type, help_: str, **limits: Any) -> Any:
    """A config field declared with its type, valid range and help (checked by validate)."""
    return field(default=default, metadata={"option": Param("", default, type_, help_,
                                                             **limits)})


def flag(name: str) -> str:
    """The command-line spelling of a config field."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    # what to train
    student: str = "resnet20"  # zoo name(s), or module.path:ClassName (any nn.Module)
    student_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor keywords
    method: str = "classroom"  # a registered method or a sum, e.g. kd+0.5*crd (ckd methods)
    variant: str | None = None  # classroom: paper | official (None: the method's default)
    granularity: str | None = None  # classroom: batch | sample
    backend: str = _opt("auto", str, "distill_loss backend",
                        choices=("auto", "triton", "reference"))
    # data
    dataset: str | None = None
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)  # synthetic: n_train, ...
    prepared: str | None = None  # beton dir written by `ckd prepare`
    loader: str = _opt("memory", str, "data loader", choices=("memory", "ffcv"))
    resolution: int | None = _opt(None, int, "image folders: the student's input size "
                                  "(default: its arch's)", low=1, optional=True)
    # mentors
    cache: str | None = None
    cache_mode: str = _opt("memory", str, "where cached logits live while training",
                           choices=("memory", "stream", "blocks"))
    order: str = _opt("random", str, "epoch order: a random permutation, or whole cache "
                      "shards (sample chunks) in a random order", choices=("random",
                                                                           "shard-blocks"))
    mentors: list[str] | None = None  # subset (teacher first); "name" or "name=path.pt"
    mentors_online: bool = _opt(False, bool, "run the mentors live")
    mentor_precision: str | None = _opt(
        None, str, "online mentors' forward precision (autocast), as `ckd cache-logits "
        "--precision`; None: a --cache's recorded one, else bf16 with --amp on CUDA, else "
        "fp32", choices=("fp32", "bf16", "fp16"), optional=True)
    mentor_dir: str | None = None  # <mentor_dir>/<dataset>/<arch>.pt; default ./mentors
    # loss hyper-parameters (None: the method's declared default, lam None: number of
    # mentors); tau sets the method's temperature (tau or T), method_params any parameter
    tau: float | None = None
    beta: float | None = None
    delta: float | None = None
    lam: float | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # a named parameter set of the method, e.g. repdistiller (kd)
    # optimisation
    epochs: int = _opt(240, int, "training epochs", low=1)
    batch_size: int = _opt(64, int, "samples per step and process", low=1)
    optimizer: str | None = None  # sgd | adamw; None: the student's default (ViT/Mamba adamw)
    # None: sgd 0.05 (0.01 for MobileNet/ShuffleNet students), adamw 1e-3
    lr: float | None = _opt(None, float, "base learning rate", low=0, low_open=True,
                            optional=True)
    momentum: float = _opt(0.9, float, "SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = _opt(5e-4, float, "SGD weight decay", low=0)
    schedule: str = _opt("step", str, "learning-rate schedule (cosine: linear warm-up over "
                         "--warmup-epochs, default 0, then cosine to 0)",
                         choices=("step", "classroom-warmup", "constant", "cosine"))
    milestones: list[int] | None = None  # None: 150,180,210 scaled to `epochs`
    gamma: float = _opt(0.1, float, "learning-rate factor at each milestone", low=0,
                        low_open=True, high=1)
    # classroom-warmup; None: 120 scaled to `epochs`
    warmup_epochs: int | None = _opt(None, int, "warm-up epochs of classroom-warmup or "
                                     "cosine", low=1, optional=True)
    warmup_end_lr: float = _opt(0.01, float, "learning rate at the end of the warm-up",
                                low=0, low_open=True)
    # the ImageNet recipe's knobs (supervised mentors: `ckd train-mentor`)
    label_smoothing: float = _opt(0.0, float, "label smoothing of the cross-entropy (--method "
                                  "nokd, train-mentor)", low=0.0, high=1.0, high_open=True)
    decay_norm_bias: bool = _opt(True, bool, "weight decay on biases and normalisation "
                                 "weights too (off: only on weight matrices and kernels)")
    seed: int = _opt(0, int, "seed of the views, the order and the initial weights", low=0)
    # run
    out: str | None = None
    resume: bool = _opt(False, bool, "continue the run in --out")
    resume_allow: list[str] | None = None  # settings a --resume may change (recorded)
    overwrite: bool = _opt(False, bool, "start over in an --out that holds a run")
    device: str | None = None  # None: cuda if available else cpu
    amp: bool = _opt(True, bool, "bf16 autocast (CUDA only)")
    # bit-for-bit GPU runs (ckd.determinism); online mentors then run as the cache's: fp32
    deterministic: bool = _opt(False, bool, "deterministic algorithms (cuDNN, cuBLAS)")
    # the student (CPU and CUDA); online mentors follow `ckd cache-logits` (load_mentor)
    channels_last: bool = _opt(True, bool, "channels_last memory format")
    compile: bool = _opt(False, bool, "torch.compile the student")
    cuda_graphs: bool = _opt(False, bool, "replay the training step from a CUDA graph")
    log_every: int = _opt(50, int, "steps between metrics records", low=1)
    max_steps_per_epoch: int | None = _opt(None, int, "truncate epochs (tests, benchmarks)",
                                           low=1, optional=True)
    progress: bool = _opt(True, bool, "progress bars")
    tensorboard: str | None = _opt(None, str, "TensorBoard folder: each run's scalars (loss "
                                   "terms, accuracies, lr, mentor ranks and temperatures, "
                                   "step time) and mentor histograms in <folder>/<run name>, "
                                   "beside metrics.jsonl", optional=True)
    eval_every: int = _opt(1, int, "epochs between test evaluations", low=1)

    def resolved_optimizer(self) -> str:
        from ckd.models.registry import default_optimizer  # noqa: PLC0415 - light import

        return self.optimizer or default_optimizer(self.student)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        from ckd.models.registry import canonical_arch  # noqa: PLC0415 - light import

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
        for f in dataclasses.fields(self):
            if "option" in f.metadata:
                setattr(self, f.name, f.metadata["option"].check(getattr(self, f.name),
                                                                 label=flag(f.name)))
        self.loss_plan()
        self._check_schedule()
        if self.dataset is not None:
            from ckd.data.datasets import dataset_options  # noqa: PLC0415

            dataset_options(self.dataset, self.dataset_options)
        check_existing_dir(self.prepared, "--prepared", "write it with `ckd prepare`")
        check_existing_dir(self.cache, "--cache", "build it with `ckd cache-logits`")
        check_writable_dir(self.out, "--out")
        if self.tensorboard is not None:
            check_writable_dir(self.tensorboard, "--tensorboard")
            from ckd.train.tensorboard import summary_writer_class  # noqa: PLC0415

            summary_writer_class()  # a missing package: one line, before any work
        check_device(self.device)
        check_triton_backend(self.backend, self.device)
        if self.cuda_graphs:
            self._check_cuda_graphs()
        if self.optimizer not in (None, "sgd", "adamw"):
            raise ValueError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.dataset is None and self.prepared is None:
            raise ValueError("no data: pass --dataset NAME (with --data-dir) or "
                             "--prepared DIR (from `ckd prepare`)")
        if self.loader == "ffcv" and self.prepared is None:
            raise ValueError("--loader ffcv reads beton files: pass --prepared DIR "
                             "(write it with `ckd prepare`)")

    def _check_cuda_graphs(self) -> None:
        import torch  # noqa: PLC0415 - only when graphs are asked for

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
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

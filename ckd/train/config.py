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

from ckd.io import atomic_write_text
from ckd.methods import LossPlan, make_plan

# Students trained at lr 0.01 in the paper (MobileNet/ShuffleNet), canonical names.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


@dataclass
class TrainConfig:
    # what to train
    student: str = "resnet20"
    method: str = "classroom"  # a registered method or a sum, e.g. kd+0.5*crd (ckd methods)
    variant: str | None = None  # classroom: paper | official (None: the method's default)
    granularity: str | None = None  # classroom: batch | sample
    backend: str = "auto"  # distill_loss backend: auto | triton | reference
    # data
    dataset: str | None = None
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)  # synthetic: n_train, ...
    prepared: str | None = None  # beton dir written by `ckd prepare`
    loader: str = "memory"  # memory | ffcv
    # mentors
    cache: str | None = None
    cache_mode: str = "memory"  # memory | stream
    mentors: list[str] | None = None  # subset (teacher first); "name" or "name=path.pt"
    mentors_online: bool = False
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
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None  # None: 0.05, or 0.01 for MobileNet/ShuffleNet students
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step | classroom-warmup | constant
    milestones: list[int] | None = None  # None: 150,180,210 scaled to `epochs`
    gamma: float = 0.1
    warmup_epochs: int | None = None  # classroom-warmup; None: 120 scaled to `epochs`
    warmup_end_lr: float = 0.01
    seed: int = 0
    # run
    out: str | None = None
    resume: bool = False
    resume_allow: list[str] | None = None  # settings a --resume may change (recorded)
    overwrite: bool = False  # start over in an --out that holds a run
    device: str | None = None  # None: cuda if available else cpu
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = True  # student (CPU and CUDA) and online mentors (CUDA)
    compile: bool = False
    log_every: int = 50
    max_steps_per_epoch: int | None = None  # truncate epochs (tests, benchmarks)
    progress: bool = True
    eval_every: int = 1

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        from ckd.models import resolve_arch  # noqa: PLC0415 - keep config import light

        return 0.01 if resolve_arch(self.student) in LOW_LR_STUDENTS else 0.05

    def loss_plan(self) -> LossPlan:
        """The run's loss, every method parameter resolved and checked (ckd.methods)."""
        shortcuts = dict(tau=self.tau, beta=self.beta, delta=self.delta, lam=self.lam,
                         variant=self.variant, granularity=self.granularity)
        return make_plan(self.method, self.method_params, self.preset, shortcuts,
                         backend=self.backend)

    def validate(self) -> None:
        self.loss_plan()
        if self.loader not in ("memory", "ffcv"):
            raise ValueError(f"--loader must be memory or ffcv, got {self.loader!r}")
        if self.schedule not in ("step", "classroom-warmup", "constant"):
            raise ValueError(f"--schedule must be step, classroom-warmup or constant, "
                             f"got {self.schedule!r}")
        if self.dataset is None and self.prepared is None:
            raise ValueError("no data: pass --dataset NAME (with --data-dir) or "
                             "--prepared DIR (from `ckd prepare`)")
        if self.loader == "ffcv" and self.prepared is None:
            raise ValueError("--loader ffcv reads beton files: pass --prepared DIR "
                             "(write it with `ckd prepare`)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be >= 1")

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
            values[key] = [int(s) for s in parts] if key == "milestones" else parts
    for key in ("method_params", "dataset_options"):
        if values.get(key) is not None and not isinstance(values[key], dict):
            raise ValueError(f"{key} must be a mapping, got {values[key]!r}")
    return TrainConfig(**values)


def as_config(config: TrainConfig | dict[str, Any] | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return load_config(None, **config)
    return load_config(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

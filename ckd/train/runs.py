"""One training run's state and its setup: data, mentor source, loaders, the run folder
(locked, resumed or refused), the student, its optimizer and schedule. Several students of
one pass share the data, loaders and mentor source (`Shared`)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckd.data.loaders import Loader
from ckd.data.protocol import TrainingData
from ckd.methods import LossPlan
from ckd.train.checkpoint import set_rng_state
from ckd.train.config import TrainConfig, save_config
from ckd.train.ddp import DistInfo, wrap
from ckd.train.features import MODULES_KEY, FeatureRun, check_module_state, make_feature_run
from ckd.train.mentors import MentorSource, default_precision, make_mentor_source
from ckd.train.metrics import MetricsLogger
from ckd.train.optim import make_optimizer, param_groups
from ckd.train.run_dir import check_run_shape, resume_state, run_folder_lock
from ckd.train.schedules import make_schedule
from ckd.train.setup import build_student, load_data, make_loaders


def default_run_dir(cfg: TrainConfig, dataset_name: str) -> Path:
    return Path("runs") / f"{dataset_name}-{cfg.student}-{cfg.method}-s{cfg.seed}"



def _autocast_factory(device: torch.device, enabled: bool, cuda_graphs: bool = False):
    if device.type == "cuda" and enabled:
        # a captured region must not use autocast's weight cast cache (torch's rule)
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16,
                                      cache_enabled=not cuda_graphs)
    return contextlib.nullcontext


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)



def student_names(student: str) -> list[str]:
    """`--student r8,r14,wrn_16_1` -> three students trained side by side."""
    names = [s.strip() for s in str(student).split(",") if s.strip()]
    if not names:
        raise ValueError("--student is empty: name a zoo student (`ckd models`) or several, "
                         "comma-separated")
    if len(set(names)) != len(names):
        raise ValueError(f"--student {student!r} names a student twice: each student of one "
                         "pass needs its own name (its run sub-folder)")
    return names


@dataclass
class Run:
    """Everything one training run holds between steps."""

    cfg: TrainConfig
    info: DistInfo
    ds: TrainingData
    source: MentorSource
    loss_plan: LossPlan
    train_loader: Loader
    test_loader: Loader
    run_dir: Path
    student: torch.nn.Module
    model: torch.nn.Module  # DDP-wrapped (and compiled) student the step calls
    opt: torch.optim.Optimizer
    sched: Any
    logger: MetricsLogger
    autocast: Any
    steps_per_epoch: int
    start_epoch: int = 0
    step: int = 0
    best_acc: float = 0.0
    last_acc: float = float("nan")
    imgs_per_s: float = float("nan")
    history: list[dict[str, Any]] = field(default_factory=list)
    feat: FeatureRun | None = None  # feature terms: their modules and inputs
    captured: Any = None  # --cuda-graphs: ckd.train.graphs.CapturedTraining


@dataclass
class Shared:
    """What the students of one pass share: data, loaders, mentor source, loss plan."""

    ds: TrainingData
    source: MentorSource
    loss_plan: LossPlan
    train_loader: Loader
    test_loader: Loader
    autocast: Any


def setup_shared(cfg: TrainConfig, info: DistInfo, stack: contextlib.ExitStack) -> Shared:
    autocast = _autocast_factory(info.device, cfg.amp, cfg.cuda_graphs)
    ds = load_data(cfg)
    plan = cfg.loss_plan()
    source = make_mentor_source(
        ds, info.device, plan, cache=cfg.cache, cache_mode=cfg.cache_mode,
        mentors=cfg.mentors, online=cfg.mentors_online, precision=cfg.mentor_precision,
        fallback_precision=default_precision(info.device, cfg.amp, cfg.deterministic),
        mentor_dir=cfg.mentor_dir, seed=cfg.seed)
    # the cache's reader thread stops with the run: none may be mid-request on an object
    # store when the interpreter exits (obstore's runtime would then abort the process)
    stack.callback(source.close)
    train_loader, test_loader = make_loaders(cfg, ds, info.device, info.rank, info.world_size,
                                             mentor_sizes=source.sizes)
    source.attach(train_loader)
    return Shared(ds, source, plan, train_loader, test_loader, autocast)


def setup_runs(cfg: TrainConfig, info: DistInfo, stack: contextlib.ExitStack) -> list[Run]:
    """One Run per student. Several students share the data, loaders and mentor source
    (one stream, one cache gather per step); each has its own sub-folder <out>/<student>
    with its config, optimizer, schedule, metrics, checkpoints and --resume."""
    names = student_names(cfg.student)
    if cfg.out and info.is_main:
        check_run_shape(Path(cfg.out), names, cfg)
    if len(names) == 1:
        return [setup_run(cfg, info, stack)]
    shared = setup_shared(cfg, info, stack)
    base = Path(cfg.out) if cfg.out else default_run_dir(
        dataclasses.replace(cfg, student="+".join(names)), shared.ds.name)
    runs = [setup_student(dataclasses.replace(cfg, student=name, out=str(base / name)),
                          info, stack, shared) for name in names]
    starts = {run.run_dir.name: run.start_epoch for run in runs}
    if len(set(starts.values())) > 1:
        raise ValueError(f"--resume: the students' checkpoints stopped at different epochs "
                         f"({starts}); resume each with its own `ckd train --student NAME "
                         f"--out {base}/NAME --resume`, or start a new --out")
    return runs


def setup_run(cfg: TrainConfig, info: DistInfo, stack: contextlib.ExitStack) -> Run:
    """Data, mentors, loaders, the run folder (locked, resumed or refused), the student and
    its optimizer: every check that can fail runs here, before the first step."""
    return setup_student(cfg, info, stack, setup_shared(cfg, info, stack))


def setup_student(cfg: TrainConfig, info: DistInfo, stack: contextlib.ExitStack,
                  shared: Shared) -> Run:
    """The run folder (locked, resumed or refused), the student and its optimizer."""
    device = info.device
    ds, source, loss_plan, autocast = shared.ds, shared.source, shared.loss_plan, shared.autocast
    train_loader, test_loader = shared.train_loader, shared.test_loader
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg, ds.name)
    cfg.out = str(run_dir)
    if info.is_main:  # one writer per run folder; the lock dies with this process
        stack.enter_context(run_folder_lock(run_dir))
    state = resume_state(run_dir, cfg, device)

    _seed_everything(cfg.seed)
    student = build_student(cfg, ds).to(device)
    if cfg.channels_last:  # faster on CUDA and on CPU (benchmarks/RESULTS.md)
        student = student.to(memory_format=torch.channels_last)
    base_lr = cfg.resolved_lr()
    feat = make_feature_run(cfg, loss_plan, ds, source, student, device)
    opt = make_optimizer(cfg.resolved_optimizer(),
                         [*param_groups(student, cfg.weight_decay, cfg.decay_norm_bias),
                          *feat.param_group(base_lr, cfg.momentum, cfg.weight_decay)],
                         base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = make_schedule(cfg.schedule, base_lr=base_lr, epochs=cfg.epochs,
                          milestones=cfg.milestones, gamma=cfg.gamma,
                          warmup_epochs=cfg.warmup_epochs, warmup_end_lr=cfg.warmup_end_lr)
    model = wrap(student, info)
    steps = len(train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    run = Run(cfg, info, ds, source, loss_plan, train_loader, test_loader, run_dir, student,
              torch.compile(model) if cfg.compile else model, opt, sched,
              MetricsLogger(run_dir, info.is_main), autocast, steps, feat=feat)
    if state is not None:
        student.load_state_dict(state["model"])
        check_module_state(state, feat.modules, cfg.method, str(run_dir))
        if feat.modules is not None:
            feat.modules.load_state_dict(state[MODULES_KEY])
        opt.load_state_dict(state["optimizer"])
        run.start_epoch, run.step = int(state["epoch"]), int(state["step"])
        run.best_acc, run.last_acc = float(state["best_acc"]), float(state["last_acc"])
        set_rng_state(state["rng"])
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if cfg.tensorboard is not None:
            run.logger.open_tensorboard(cfg.tensorboard, None if state is None else run.step)
        if state is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            run.logger.write({"type": "run", "method": cfg.method, "student": cfg.student,
                              "dataset": ds.name, "num_classes": ds.num_classes,
                              "mentors": source.names, "mentor_source": source.kind,
                              "world_size": info.world_size, "device": str(device),
                              "loss": loss_plan.describe(), "lr": base_lr,
                              "epochs": cfg.epochs, "method_modules": feat.summary()})
        else:
            run.logger.truncate_after(run.start_epoch)
            for change in state.get("allowed_changes", []):
                run.logger.write({"type": "config_change", "epoch": run.start_epoch, **change})
    return run

"""The training loop, top to bottom: data resident on the device, views applied on the
device, mentor logits from the cache (or live mentors), the fused loss, SGD. Losses and
stats stay on the device and are read only at log intervals (no host sync in the step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ckd.features.runtime import (
    MODULES_KEY,
    FeatureRun,
    check_module_state,
    make_feature_run,
    sync_module_grads,
)
from ckd.methods import LossPlan
from ckd.train.checkpoint import save_training_state, set_rng_state
from ckd.train.config import TrainConfig, as_config, save_config
from ckd.train.ddp import (
    DistInfo,
    all_reduce,
    barrier,
    broadcast_buffers,
    cleanup,
    init_distributed,
    wrap,
)
from ckd.train.mentors import MentorSource, make_mentor_source
from ckd.train.metrics import MetricsLogger
from ckd.train.optim import make_optimizer
from ckd.train.run_dir import resume_state, run_folder_lock
from ckd.train.schedules import make_schedule
from ckd.train.setup import build_student, load_data, make_loaders, norm_name


def default_run_dir(cfg: TrainConfig, dataset_name: str) -> Path:
    return Path("runs") / f"{dataset_name}-{cfg.student}-{cfg.method}-s{cfg.seed}"


class DeviceSums:
    """Running sums kept on the device; `read()` is the only host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.count = 0  # samples: a host int (batch sizes are known without a sync)

    def add(self, name: str, value: torch.Tensor) -> None:
        if name == "nonfinite":  # a bit flag: OR it, never add
            v = value.detach().to(torch.int32)
            self.sums[name] = self.sums[name] | v if name in self.sums else v.clone()
            return
        v = value.detach().float()
        self.sums[name] = self.sums[name] + v if name in self.sums else v.clone()

    def read(self) -> dict[str, Any]:
        return {k: v.cpu() for k, v in self.sums.items()}


def _autocast_factory(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, ds, autocast, info: DistInfo,
             channels_last: bool) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean CE on the un-augmented test split. Per-index tensors
    reduced with MAX, so the sharded loader's wrap-around repeats are counted once."""
    from ckd.data.views import IDENTITY_VIEW, apply_views  # noqa: PLC0415

    model.eval()
    n = len(ds.test)
    correct = torch.zeros(n, device=info.device)
    loss = torch.zeros(n, device=info.device)
    seen = torch.zeros(n, device=info.device)
    loader.set_epoch(0)
    for images, labels, idx in loader:
        vids = torch.full_like(idx, IDENTITY_VIEW)
        x = apply_views(images, vids, ds.mean, ds.std, channels_last=channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        correct[idx] = (logits.argmax(1) == labels).float()
        loss[idx] = F.cross_entropy(logits, labels, reduction="none")
        seen[idx] = 1.0
    for t in (correct, loss, seen):
        all_reduce(t, info, "max")
    total = seen.sum().clamp_min(1)
    return float(100.0 * correct.sum() / total), float(loss.sum() / total)


def train(config: TrainConfig | dict | str | Path) -> dict[str, Any]:
    """Train a student (see `TrainConfig`); returns best/last accuracy, run_dir, model..."""
    cfg = as_config(config)
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as stack:
            runs = setup_runs(cfg, info, stack)
            for epoch in range(runs[0].start_epoch, cfg.epochs):
                for run, (sums, seconds) in zip(runs, train_epoch(runs, epoch), strict=True):
                    end_epoch(run, epoch, sums, seconds)
            results = [finish_run(run) for run in runs]
            if len(results) == 1:
                return results[0]
            return {"students": results, "run_dir": str(Path(runs[0].run_dir).parent),
                    "rank": info.rank, "world_size": info.world_size}
    finally:
        cleanup(info)


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
    ds: Any
    source: MentorSource
    loss_plan: LossPlan
    train_loader: Any
    test_loader: Any
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


@dataclass
class Shared:
    """What the students of one pass share: data, loaders, mentor source, loss plan."""

    ds: Any
    source: MentorSource
    loss_plan: LossPlan
    train_loader: Any
    test_loader: Any
    autocast: Any


def setup_shared(cfg: TrainConfig, info: DistInfo) -> Shared:
    autocast = _autocast_factory(info.device, cfg.amp)
    ds = load_data(cfg)
    source = make_mentor_source(cfg, ds, info.device, autocast)
    train_loader, test_loader = make_loaders(cfg, ds, info.device, info.rank, info.world_size)
    return Shared(ds, source, cfg.loss_plan(), train_loader, test_loader, autocast)


def setup_runs(cfg: TrainConfig, info: DistInfo, stack: contextlib.ExitStack) -> list[Run]:
    """One Run per student. Several students share the data, loaders and mentor source
    (one stream, one cache gather per step); each has its own sub-folder <out>/<student>
    with its config, optimizer, schedule, metrics, checkpoints and --resume."""
    names = student_names(cfg.student)
    if len(names) == 1:
        return [setup_run(cfg, info, stack)]
    shared = setup_shared(cfg, info)
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
    return setup_student(cfg, info, stack, setup_shared(cfg, info))


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
                         [{"params": list(student.parameters())},
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


def train_epoch(runs: list[Run] | Run, epoch: int) -> list[tuple[DeviceSums, float]]:
    """One epoch of steps for every student of the pass: each batch is read, augmented and
    its mentor logits (and features) gathered once, then every student takes its own step
    on it. Returns each student's epoch sums and the epoch's wall time."""
    from ckd.data.views import apply_views  # noqa: PLC0415

    runs = [runs] if isinstance(runs, Run) else runs
    lead = runs[0]
    cfg, info, ds, source = lead.cfg, lead.info, lead.ds, lead.source
    loader = lead.train_loader
    loader.set_epoch(epoch)
    source.start_epoch(epoch, loader.order(epoch) if hasattr(loader, "order") else None)
    t_epoch = time.perf_counter()
    steppers = [_StudentEpoch(run, epoch, t_epoch) for run in runs]
    needs = lead.feat.needs  # the method's mentor-side inputs: the same for every student
    bar = tqdm(total=lead.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               unit="step", leave=False, dynamic_ncols=True,
               disable=not (cfg.progress and info.is_main))
    for i, (images, labels, idx) in enumerate(loader):
        if i >= lead.steps_per_epoch:
            break
        slots, vids = source.views(epoch, idx)
        x = apply_views(images, vids, ds.mean, ds.std, channels_last=cfg.channels_last)
        mentor, mentor_feats = source.gather(slots, idx, x, needs)
        for stepper in steppers:
            stepper.step(x, mentor, mentor_feats, labels, idx,
                         last=i == lead.steps_per_epoch - 1, bar=bar)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t_epoch
    out = []
    for stepper in steppers:
        broadcast_buffers(stepper.run.student, info)
        out.append((stepper.whole, seconds))
    return out


class _StudentEpoch:
    """One student's side of an epoch: its lr, its step on a shared batch, its sums."""

    def __init__(self, run: Run, epoch: int, t0: float) -> None:
        self.run, self.epoch = run, epoch
        self.lr = run.sched.lr_at(epoch)
        for g in run.opt.param_groups:
            g["lr"] = self.lr
        run.model.train()
        device = run.info.device
        self.interval, self.whole = DeviceSums(device), DeviceSums(device)
        self.log = _IntervalLog(run, epoch, self.lr, t0)

    def step(self, x: torch.Tensor, mentor: Any, mentor_feats: Any, labels: torch.Tensor,
             idx: torch.Tensor, last: bool, bar: Any) -> None:
        run, cfg, feat = self.run, self.run.cfg, self.run.feat
        with run.autocast():
            if feat.active:
                feats, logits = run.model(x, is_feat=True)
            else:
                feats, logits = None, run.model(x)
        out = run.loss_plan.loss(logits, mentor, labels, epoch=self.epoch, step=run.step,
                                 seed=cfg.seed, modules=feat.modules,
                                 **feat.extra(feats, mentor_feats, idx))
        run.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sync_module_grads(feat.modules)
        run.opt.step()
        run.step += 1
        correct = (logits.detach().argmax(1) == labels).float().sum()
        interval = self.interval
        for sums in (interval, self.whole):
            sums.add("loss", out.loss)
            sums.add("correct", correct)
            sums.count += labels.shape[0]
            sums.steps += 1
        # loss parts: the student's plain CE beside the total (distill part = the rest)
        interval.add("ce", F.cross_entropy(logits.detach().float(), labels))
        for k, v in out.stats.items():
            if isinstance(v, torch.Tensor) and v.numel() > 0:
                interval.add(k, v)
        if run.step % cfg.log_every == 0 or last:
            self.log.write(interval, bar)
            self.interval = DeviceSums(run.info.device)


class _IntervalLog:
    """A metrics record every `log_every` steps: the only host syncs of the step loop."""

    def __init__(self, run: Run, epoch: int, lr: float, t0: float) -> None:
        self.run, self.epoch, self.lr, self.t = run, epoch, lr, t0

    def write(self, interval: DeviceSums, bar: Any) -> None:
        from ckd.kernels import check_finite  # noqa: PLC0415

        run = self.run
        vals = interval.read()
        if "nonfinite" in vals:
            check_finite(vals)  # raises naming student, mentor or label input
        now = time.perf_counter()
        run.imgs_per_s = interval.count * run.info.world_size / max(now - self.t, 1e-9)
        self.t = now
        rec = {"type": "step", "epoch": self.epoch, "step": run.step, "lr": self.lr,
               "loss": float(vals["loss"]) / interval.steps,
               "train_acc": 100.0 * float(vals["correct"]) / interval.count,
               "img_per_s": run.imgs_per_s}
        for k, v in vals.items():
            if k not in ("loss", "correct", "nonfinite"):
                rec[k] = v / interval.steps
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']} at step {run.step} "
                                     f"(epoch {self.epoch}): lower --lr or check the data")
        run.logger.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{run.imgs_per_s:.0f}")


def end_epoch(run: Run, epoch: int, whole: DeviceSums, train_time: float) -> None:
    """Reduce the epoch's sums over ranks, evaluate, log, checkpoint (resume point)."""
    cfg, info = run.cfg, run.info
    ep = whole.read()
    tot = torch.tensor([float(ep["correct"]), float(whole.count), float(ep["loss"])],
                       dtype=torch.float64, device=info.device)
    all_reduce(tot, info)
    train_acc = 100.0 * float(tot[0] / tot[1])
    train_loss = float(tot[2]) / (whole.steps * info.world_size)
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        run.last_acc, test_loss = evaluate(run.student, run.test_loader, run.ds, run.autocast,
                                           info, cfg.channels_last)
        run.best_acc = max(run.best_acc, run.last_acc)
    else:
        test_loss = float("nan")
    rec = {"type": "epoch", "epoch": epoch, "step": run.step, "lr": run.sched.lr_at(epoch),
           "train_loss": train_loss, "train_acc": train_acc, "test_acc": run.last_acc,
           "test_loss": test_loss, "best_acc": run.best_acc, "time_s": train_time,
           "img_per_s": float(tot[1]) / max(train_time, 1e-9)}
    run.history.append(rec)
    run.logger.write(rec)
    if info.is_main:
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs} loss {train_loss:.4f} "
                       f"train {train_acc:.2f}% test {run.last_acc:.2f}% "
                       f"(best {run.best_acc:.2f}%) {rec['img_per_s']:.0f} img/s")
        save_training_state(run.run_dir, model=run.student, optimizer=run.opt,
                            schedule=run.sched.state_dict(), epoch=epoch + 1, step=run.step,
                            best_acc=run.best_acc, last_acc=run.last_acc,
                            config=cfg.to_dict(), method_modules=run.feat.modules)
    barrier(info)


def finish_run(run: Run) -> dict[str, Any]:
    """The final student checkpoint (rank 0) and the run's summary."""
    from ckd.models import save_checkpoint  # noqa: PLC0415

    cfg, info = run.cfg, run.info
    if info.is_main:
        save_checkpoint(run.run_dir / "student.pt", run.student, arch=cfg.student,
                        arch_kwargs=cfg.student_kwargs, num_classes=run.ds.num_classes,
                        dataset=run.ds.name,
                        metrics={"test_acc": run.last_acc, "best_acc": run.best_acc,
                                 "method": cfg.method, "mentors": run.source.names})
    return {"best_acc": run.best_acc, "last_acc": run.last_acc, "run_dir": str(run.run_dir),
            "dataset": run.ds.name, "num_classes": run.ds.num_classes,
            "mentors": run.source.names, "epochs": cfg.epochs, "steps": run.step,
            "steps_per_epoch": run.steps_per_epoch, "img_per_s": run.imgs_per_s,
            "history": run.history, "model": run.student, "rank": info.rank,
            "world_size": info.world_size, "method_modules": run.feat.modules}


def train_mentor(arch: str, dataset: str | None = None, *, out: str | Path | None = None,
                 mentor_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a mentor from scratch (method nokd) and write <mentor_dir>/<dataset>/<arch>.pt
    (default ./mentors; <arch> the canonical name, where `ckd cache-logits --mentors ARCH`
    and `--mentors-online` look) in ckd's checkpoint format with its test accuracy. An
    existing mentor checkpoint is replaced only with `overwrite=True` (checked first)."""
    from ckd.models import resolve_arch, save_checkpoint  # noqa: PLC0415

    resolve_arch(arch)  # unknown arch: clear error before loading data
    values = {**overrides, "student": arch, "method": "nokd", "dataset": dataset,
              "cache": None, "mentors": None, "mentors_online": False}
    cfg = as_config({k: v for k, v in values.items() if v is not None})
    name = _dataset_name(cfg)
    if out is None:
        out = Path("runs") / f"mentor-{name}-{arch}"
    cfg.out = str(out)

    def mentor_file(ds_name: str) -> Path:
        path = Path(mentor_dir or "mentors") / ds_name / f"{resolve_arch(arch)}.pt"
        if path.exists() and not cfg.overwrite:
            raise FileExistsError(f"{path} already holds a mentor (a cache may record its "
                                  "hash): pass --overwrite to replace it, or --mentor-dir "
                                  "to write elsewhere")
        return path

    mentor_file(name)
    result = train(cfg)
    path = mentor_file(result["dataset"])
    if result["rank"] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, result["model"], arch=resolve_arch(arch),
                        num_classes=result["num_classes"], dataset=result["dataset"],
                        metrics={"test_acc": result["last_acc"], "best_acc": result["best_acc"],
                                 "epochs": cfg.epochs})
    result["mentor_path"] = str(path)
    return result


def _dataset_name(cfg: TrainConfig) -> str:
    """The dataset's name before loading it (the prepared folder's meta.json records it)."""
    if cfg.prepared is not None:
        from ckd.data.beton import read_meta  # noqa: PLC0415

        return str(read_meta(cfg.prepared)["name"])
    return norm_name(str(cfg.dataset))

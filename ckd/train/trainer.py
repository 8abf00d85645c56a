"""The training loop, top to bottom: data resident on the device, views applied on the
device, mentor logits from the cache (or live mentors), the fused loss, SGD. Losses and
stats stay on the device and are read only at log intervals (no host sync in the step).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ckd.train.checkpoint import load_training_state, save_training_state, set_rng_state
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
from ckd.train.methods import METHODS
from ckd.train.metrics import MetricsLogger
from ckd.train.schedules import make_schedule
from ckd.train.setup import load_data, make_loaders, make_mentor_source

STAT_KEYS = ("mentor_rank", "mentor_active", "mentor_temp", "student_rank")


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
        return _train(cfg, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    from ckd.data.views import apply_views  # noqa: PLC0415
    from ckd.kernels import check_finite, distill_loss  # noqa: PLC0415
    from ckd.models import create_model, save_checkpoint  # noqa: PLC0415

    device = info.device
    cl = cfg.channels_last  # faster on CUDA and on CPU (benchmarks/RESULTS.md)
    autocast = _autocast_factory(device, cfg.amp)
    ds = load_data(cfg)
    source = make_mentor_source(cfg, ds, device, autocast)
    loss_kw = cfg.loss_kwargs(len(source.names))
    counters = METHODS[cfg.method].counters
    train_loader, test_loader = make_loaders(cfg, ds, device, info.rank, info.world_size)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg, ds.name)
    cfg.out = str(run_dir)

    state = load_training_state(run_dir, device)
    if state is not None and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a training checkpoint: pass --resume "
                              "to continue it, or a new --out")
    if state is not None:  # resuming another experiment into this folder would mix runs
        old = state.get("config", {})
        diff = [k for k in ("student", "method", "dataset", "prepared", "seed", "batch_size",
                            "mentors") if k in old and old[k] != getattr(cfg, k)]
        if diff:
            raise ValueError(f"--resume: {run_dir} was trained with other settings ("
                             + ", ".join(f"{k}={old[k]!r} vs {getattr(cfg, k)!r}" for k in diff)
                             + "): use the same settings or a new --out")
    _seed_everything(cfg.seed)
    student = create_model(cfg.student, ds.num_classes).to(device)
    if cl:
        student = student.to(memory_format=torch.channels_last)
    base_lr = cfg.resolved_lr()
    opt = torch.optim.SGD(student.parameters(), lr=base_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = make_schedule(cfg.schedule, base_lr=base_lr, epochs=cfg.epochs,
                          milestones=cfg.milestones, gamma=cfg.gamma,
                          warmup_epochs=cfg.warmup_epochs, warmup_end_lr=cfg.warmup_end_lr)
    start_epoch, step, best_acc, last_acc = 0, 0, 0.0, float("nan")
    if state is not None:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_acc, last_acc = float(state["best_acc"]), float(state["last_acc"])
        set_rng_state(state["rng"])
    model = wrap(student, info)
    fwd = torch.compile(model) if cfg.compile else model

    logger = MetricsLogger(run_dir, info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if state is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            logger.write({"type": "run", "method": cfg.method, "student": cfg.student,
                          "dataset": ds.name, "num_classes": ds.num_classes,
                          "mentors": source.names, "mentor_source": source.kind,
                          "world_size": info.world_size, "device": str(device),
                          "loss_kwargs": loss_kw, "lr": base_lr, "epochs": cfg.epochs})
        else:
            logger.truncate_after(start_epoch)
    history: list[dict[str, Any]] = []
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    imgs_per_s = float("nan")

    for epoch in range(start_epoch, cfg.epochs):
        lr = sched.lr_at(epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        train_loader.set_epoch(epoch)
        order = train_loader.order(epoch) if hasattr(train_loader, "order") else None
        source.start_epoch(epoch, order)  # stream cache: plan this rank's rows, prefetch
        model.train()
        interval, whole = DeviceSums(device), DeviceSums(device)
        t_epoch = t_log = time.perf_counter()
        n_log = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="step", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress and info.is_main))
        for i, (images, labels, idx) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            slots, vids = source.views(epoch, idx)
            x = apply_views(images, vids, ds.mean, ds.std, channels_last=cl)
            mentor = source.logits(slots, idx, x)
            extra = {k: v for k, v in (("epoch", epoch), ("step", step), ("seed", cfg.seed))
                     if k in counters}
            with autocast():
                logits = fwd(x)
            out = distill_loss(logits, mentor, labels, **loss_kw, **extra)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            step += 1
            n_log += labels.shape[0]
            correct = (logits.detach().argmax(1) == labels).float().sum()
            for sums in (interval, whole):
                sums.add("loss", out.loss)
                sums.add("correct", correct)
                sums.count += labels.shape[0]
                sums.steps += 1
            # loss parts: the student's plain CE beside the total (distill part = the rest)
            interval.add("ce", F.cross_entropy(logits.detach().float(), labels))
            for k, v in out.stats.items():
                if isinstance(v, torch.Tensor) and v.numel() > 0:
                    interval.add(k, v)
            bar.update(1)
            if step % cfg.log_every == 0 or i == steps_per_epoch - 1:
                vals = interval.read()
                if "nonfinite" in vals:
                    check_finite(vals)  # raises naming student, mentor or label input
                now = time.perf_counter()
                imgs_per_s = n_log * info.world_size / max(now - t_log, 1e-9)
                rec = {"type": "step", "epoch": epoch, "step": step, "lr": lr,
                       "loss": float(vals["loss"]) / interval.steps,
                       "train_acc": 100.0 * float(vals["correct"]) / interval.count,
                       "img_per_s": imgs_per_s}
                for k, v in vals.items():
                    if k not in ("loss", "correct", "nonfinite"):
                        rec[k] = v / interval.steps
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"loss is {rec['loss']} at step {step} "
                                             f"(epoch {epoch}): lower --lr or check the data")
                logger.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{imgs_per_s:.0f}")
                interval, t_log, n_log = DeviceSums(device), now, 0
        bar.close()
        broadcast_buffers(student, info)
        train_time = time.perf_counter() - t_epoch
        ep = whole.read()
        tot = torch.tensor([float(ep["correct"]), float(whole.count), float(ep["loss"])],
                           dtype=torch.float64, device=device)
        all_reduce(tot, info)
        train_acc = 100.0 * float(tot[0] / tot[1])
        train_loss = float(tot[2]) / (whole.steps * info.world_size)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            last_acc, test_loss = evaluate(student, test_loader, ds, autocast, info, cl)
            best_acc = max(best_acc, last_acc)
        else:
            test_loss = float("nan")
        rec = {"type": "epoch", "epoch": epoch, "step": step, "lr": lr,
               "train_loss": train_loss, "train_acc": train_acc, "test_acc": last_acc,
               "test_loss": test_loss, "best_acc": best_acc, "time_s": train_time,
               "img_per_s": float(tot[1]) / max(train_time, 1e-9)}
        history.append(rec)
        logger.write(rec)
        if info.is_main:
            if cfg.progress:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs} loss {train_loss:.4f} "
                           f"train {train_acc:.2f}% test {last_acc:.2f}% "
                           f"(best {best_acc:.2f}%) {rec['img_per_s']:.0f} img/s")
            save_training_state(run_dir, model=student, optimizer=opt,
                                schedule=sched.state_dict(), epoch=epoch + 1, step=step,
                                best_acc=best_acc, last_acc=last_acc, config=cfg.to_dict())
        barrier(info)

    if info.is_main:
        save_checkpoint(run_dir / "student.pt", student, arch=cfg.student,
                        num_classes=ds.num_classes, dataset=ds.name,
                        metrics={"test_acc": last_acc, "best_acc": best_acc,
                                 "method": cfg.method, "mentors": source.names})
    return {"best_acc": best_acc, "last_acc": last_acc, "run_dir": str(run_dir),
            "dataset": ds.name, "num_classes": ds.num_classes, "mentors": source.names,
            "epochs": cfg.epochs, "steps": step, "steps_per_epoch": steps_per_epoch,
            "img_per_s": imgs_per_s, "history": history, "model": student,
            "rank": info.rank, "world_size": info.world_size}


def train_mentor(arch: str, dataset: str | None = None, *, out: str | Path | None = None,
                 mentor_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a mentor from scratch (method nokd) and write <mentor_dir>/<dataset>/<arch>.pt
    (default ./mentors; <arch> the canonical name, where `ckd cache-logits --mentors ARCH`
    and `--mentors-online` look) in ckd's checkpoint format with its test accuracy."""
    from ckd.models import resolve_arch, save_checkpoint  # noqa: PLC0415

    resolve_arch(arch)  # unknown arch: clear error before loading data
    values = {**overrides, "student": arch, "method": "nokd", "dataset": dataset,
              "cache": None, "mentors": None, "mentors_online": False}
    cfg = as_config({k: v for k, v in values.items() if v is not None})
    if out is None:
        name = dataset or Path(cfg.prepared or "prepared").name
        out = Path("runs") / f"mentor-{name}-{arch}"
    cfg.out = str(out)
    result = train(cfg)
    path = Path(mentor_dir or "mentors") / result["dataset"] / f"{resolve_arch(arch)}.pt"
    if result["rank"] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, result["model"], arch=resolve_arch(arch),
                        num_classes=result["num_classes"], dataset=result["dataset"],
                        metrics={"test_acc": result["last_acc"], "best_acc": result["best_acc"],
                                 "epochs": cfg.epochs})
    result["mentor_path"] = str(path)
    return result

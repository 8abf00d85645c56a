"""The training loop, top to bottom: data resident on the device, views applied on the
device, mentor logits from the cache (or live mentors), the fused loss, SGD. Losses and
stats stay on the device and are read only at log intervals (no host sync in the step).
A run's setup lives in runs.py, the epoch's step loop in epoch.py; here the epochs, the
evaluation, the checkpoints and mentor training.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ckd.data.beton import read_meta
from ckd.data.image_views import prepared_kind
from ckd.data.protocol import TrainingData
from ckd.data.views import IDENTITY_VIEW
from ckd.determinism import deterministic
from ckd.models import resolve_arch, save_checkpoint
from ckd.train.checkpoint import save_training_state
from ckd.train.config import TrainConfig, as_config
from ckd.train.ddp import DistInfo, all_reduce, barrier, cleanup, init_distributed
from ckd.train.epoch import DeviceSums, train_epoch
from ckd.train.runs import Run, setup_runs
from ckd.train.setup import norm_name


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, ds: TrainingData, autocast, info: DistInfo,
             channels_last: bool) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean CE on the un-augmented test split. Per-index tensors
    reduced with MAX, so the sharded loader's wrap-around repeats are counted once."""
    model.eval()
    n = len(ds.test)
    correct = torch.zeros(n, device=info.device)
    loss = torch.zeros(n, device=info.device)
    seen = torch.zeros(n, device=info.device)
    loader.set_epoch(0)
    for images, labels, idx in loader:
        vids = torch.full_like(idx, IDENTITY_VIEW)
        x = ds.recipe.student_input(images, vids, ds.mean, ds.std, channels_last=channels_last)
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
    with deterministic(cfg.deterministic):  # before CUDA starts (cuBLAS's workspace)
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
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
    resolve_arch(arch)  # unknown arch: clear error before loading data
    values = {**overrides, "student": arch, "method": "nokd", "dataset": dataset,
              "cache": None, "mentors": None, "mentors_online": False}
    cfg = as_config({k: v for k, v in values.items() if v is not None})
    if cfg.prepared is not None and prepared_kind(cfg.prepared) == "images":
        # an image folder's crops are replayed from a logit cache, which a new mentor lacks
        raise ValueError(f"--prepared {cfg.prepared} is an image folder, which `ckd "
                         "train-mentor` cannot train on yet: train the mentor on CIFAR-style "
                         "data, or bring a trained checkpoint and cache it with `ckd "
                         "cache-logits --prepared DIR --mentors ALIAS=CHECKPOINT --views K`")
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
        return str(read_meta(cfg.prepared)["name"])
    return norm_name(str(cfg.dataset))

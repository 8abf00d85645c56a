"""One epoch of training steps: each batch is read, augmented and its mentor logits
gathered once, then every student of the pass takes its step on it. Losses and stats stay on
the device (`DeviceSums`) and are read only at log intervals (no host sync in the step)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ckd.kernels import NonFiniteError, check_finite
from ckd.kernels.api import resolve_backend
from ckd.train.ddp import broadcast_buffers
from ckd.train.features import sync_module_grads
from ckd.train.graphs import CapturedTraining
from ckd.train.runs import Run


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


def train_epoch(runs: list[Run] | Run, epoch: int) -> list[tuple[DeviceSums, float]]:
    """One epoch of steps for every student of the pass: each batch is read, augmented and
    its mentor logits (and features) gathered once, then every student takes its own step
    on it. Returns each student's epoch sums and the epoch's wall time."""
    runs = [runs] if isinstance(runs, Run) else runs
    lead = runs[0]
    cfg, info, ds, source = lead.cfg, lead.info, lead.ds, lead.source
    loader = lead.train_loader
    loader.set_epoch(epoch)
    source.start_epoch(epoch, loader.order(epoch) if hasattr(loader, "order") else None)
    t_epoch = time.perf_counter()
    steppers = [_StudentEpoch(run, epoch, t_epoch) for run in runs]
    needs = lead.feat.needs  # the method's mentor-side inputs: the same for every student
    stats = wants_mentor_stats(lead)
    bar = tqdm(total=lead.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               unit="step", leave=False, dynamic_ncols=True,
               disable=not (cfg.progress and info.is_main))
    for i, (images, labels, idx) in enumerate(loader):
        if i >= lead.steps_per_epoch:
            break
        slots, vids = source.views(epoch, idx)
        x = ds.recipe.student_input(images, vids, ds.mean, ds.std,
                                    channels_last=cfg.channels_last)
        mentor, mentor_stats, mentor_feats = source.gather(slots, idx, x, needs,
                                                           labels if stats else None)
        for stepper in steppers:
            stepper.step(x, mentor, mentor_stats, mentor_feats, labels, idx,
                         last=i == lead.steps_per_epoch - 1, bar=bar)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t_epoch
    out = []
    for stepper in steppers:
        broadcast_buffers(stepper.run.student, info)
        out.append((stepper.whole, seconds))
    return out


def wants_mentor_stats(run: Run) -> bool:
    """The fused loss ranks from the mentors' row statistics: gather them (the cache holds
    them) instead of letting the loss pass over every mentor row for them."""
    return run.source.kind != "none" and run.loss_plan.reads_mentor_stats and \
        resolve_backend(run.loss_plan.backend, run.info.device) == "triton"


class _StudentEpoch:
    """One student's side of an epoch: its lr, its step on a shared batch, its sums."""

    def __init__(self, run: Run, epoch: int, t0: float) -> None:
        self.run, self.epoch = run, epoch
        self.lr = run.sched.lr_at(epoch)
        for g in run.opt.param_groups:
            g["lr"] = self.lr
        if run.cfg.cuda_graphs:  # the lr and epoch the captured step reads on the device
            if run.captured is None:
                run.captured = CapturedTraining(run)
            run.captured.start_epoch(epoch, self.lr)
        run.model.train()
        device = run.info.device
        self.interval, self.whole = DeviceSums(device), DeviceSums(device)
        self.log = _IntervalLog(run, epoch, self.lr, t0)

    def step(self, x: torch.Tensor, mentor: Any, mentor_stats: torch.Tensor | None,
             mentor_feats: Any, labels: torch.Tensor, idx: torch.Tensor, last: bool,
             bar: tqdm) -> None:
        run, cfg = self.run, self.run.cfg
        if run.captured is not None:  # --cuda-graphs: replayed (full batches) or eager
            got = dict(run.captured(x, mentor, mentor_stats, labels))  # the graph's own dict
            loss, logits = got.pop("loss"), got.pop("logits")
            stats = got
        else:
            loss, logits, stats = self._eager(x, mentor, mentor_stats, mentor_feats, labels,
                                              idx)
        run.step += 1
        correct = (logits.argmax(1) == labels).float().sum()
        interval = self.interval
        for sums in (interval, self.whole):
            sums.add("loss", loss)
            sums.add("correct", correct)
            sums.count += labels.shape[0]
            sums.steps += 1
        # loss parts: the student's plain CE beside the total (distill part = the rest)
        interval.add("ce", F.cross_entropy(logits.float(), labels))
        for k, v in stats.items():
            if isinstance(v, torch.Tensor) and v.numel() > 0:
                interval.add(k, v)
        if run.step % cfg.log_every == 0 or last:
            self.log.write(interval, bar)
            self.interval = DeviceSums(run.info.device)

    def _eager(self, x: torch.Tensor, mentor: Any, mentor_stats: torch.Tensor | None,
               mentor_feats: Any, labels: torch.Tensor, idx: torch.Tensor) -> tuple:
        """One eager step -> (loss, detached logits, loss stats)."""
        run, cfg, feat = self.run, self.run.cfg, self.run.feat
        with run.autocast():
            if feat.active:
                feats, logits = run.model(x, is_feat=True)
            else:
                feats, logits = None, run.model(x)
        if logits.shape[0] != x.shape[0]:  # shape metadata only: no device sync
            raise ValueError(f"student {cfg.student!r} returned logits of shape "
                             f"{tuple(logits.shape)} for a batch of {x.shape[0]} images: its "
                             "output must be [B, C] for every batch size B (look for a "
                             "reshape or view that assumes a fixed batch size)")
        out = run.loss_plan.loss(logits, mentor, labels, epoch=self.epoch, step=run.step,
                                 seed=cfg.seed, modules=feat.modules, mentor_stats=mentor_stats,
                                 **feat.extra(feats, mentor_feats, idx))
        run.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sync_module_grads(feat.modules)
        run.opt.step()
        return out.loss, logits.detach(), out.stats


class _IntervalLog:
    """A metrics record every `log_every` steps: the only host syncs of the step loop."""

    def __init__(self, run: Run, epoch: int, lr: float, t0: float) -> None:
        self.run, self.epoch, self.lr, self.t = run, epoch, lr, t0

    def write(self, interval: DeviceSums, bar: tqdm) -> None:
        run = self.run
        vals = interval.read()
        if "nonfinite" in vals:
            try:
                check_finite(vals)  # raises naming student, mentor or label input
            except NonFiniteError as err:
                raise NonFiniteError(self._where(err, interval)) from None
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
            raise FloatingPointError(f"training stopped: the loss is {rec['loss']} at "
                                     f"{self._steps(interval)}: lower --lr (or check the data and "
                                     "the student's forward)")
        run.logger.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{run.imgs_per_s:.0f}")

    def _steps(self, interval: DeviceSums) -> str:
        last = self.run.step
        first = last - interval.steps + 1
        steps = f"step {last}" if first == last else f"steps {first}..{last}"
        cfg = self.run.cfg
        return f"{steps} (epoch {self.epoch + 1}/{cfg.epochs}; checked every --log-every " \
            f"{cfg.log_every} steps)"

    def _where(self, err: Exception, interval: DeviceSums) -> str:
        """The kernel's finding, with when it happened (and which mentors: online ones)."""
        text = f"training stopped at {self._steps(interval)}: {err}"
        if self.run.cfg.mentors_online and "mentor" in str(err):
            text += " (the mentors run online here: a mentor checkpoint is broken or " \
                "diverged; retrain or replace it)"
        return text

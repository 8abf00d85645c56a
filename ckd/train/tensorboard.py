"""`--tensorboard DIR`: every metrics.jsonl record of a run also goes to TensorBoard, in
DIR/<run folder name> (so `tensorboard --logdir DIR` compares runs). metrics.jsonl stays
the record `ckd report` reads; this is a view of the same numbers, written as they come.

Step records: `train/loss`, `train/acc`, `lr`, `time/img_per_s`, `time/step_s`, each
loss term and statistic the method reports (`loss/...`), and per mentor its rank,
temperature and activity (`mentors/<stat>/<mentor>`) with a histogram over the mentors of
each (`mentors/<stat>`). Epoch records: `epoch/...` (train and test accuracy and loss,
best accuracy, epoch time). The x axis is the optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MISSING = ("--tensorboard needs the tensorboard package, which does not import here ({err}): "
           "install it with `pip install tensorboard` (`make setup` does), or drop "
           "--tensorboard (metrics.jsonl holds the same numbers)")


def summary_writer_class() -> Any:
    """torch's SummaryWriter, or one line naming the fix when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional
    except ImportError as err:
        raise ImportError(MISSING.format(err=err)) from err
    return SummaryWriter


class TensorBoardLog:
    """Writes metrics records as TensorBoard scalars and histograms."""

    def __init__(self, log_dir: str | Path, run_name: str,
                 purge_step: int | None = None) -> None:
        self._torch = torch
        self.writer = summary_writer_class()(log_dir=str(Path(log_dir) / run_name),
                                             purge_step=purge_step)
        self.mentors: list[str] = []

    def record(self, rec: dict[str, Any]) -> None:
        kind = rec.get("type")
        if kind == "run":
            self.mentors = [str(m) for m in rec.get("mentors") or []]
            self.writer.add_text("run", "\n".join(f"{k}: {v}" for k, v in rec.items()))
            return
        step = int(rec.get("step", 0))
        if kind == "step":
            self._step(rec, step)
        elif kind == "epoch":
            for k in ("train_loss", "train_acc", "test_acc", "test_loss", "best_acc", "time_s",
                      "img_per_s"):
                v = rec.get(k)
                if isinstance(v, int | float) and v == v:  # NaN: not evaluated this epoch
                    self.writer.add_scalar(f"epoch/{k}", float(v), step)
        self.writer.flush()

    def _step(self, rec: dict[str, Any], step: int) -> None:
        named = {"loss": "train/loss", "train_acc": "train/acc", "lr": "lr",
                 "img_per_s": "time/img_per_s", "step_s": "time/step_s"}
        for k, v in rec.items():
            if k in ("type", "epoch", "step"):
                continue
            if isinstance(v, list):  # one value per mentor
                flat = [float(x) for x in _flatten(v)]
                if not flat:
                    continue
                names = self.mentors if len(self.mentors) == len(flat) else \
                    [str(i) for i in range(len(flat))]
                for name, x in zip(names, flat, strict=True):
                    self.writer.add_scalar(f"mentors/{k}/{name}", x, step)
                self.writer.add_histogram(f"mentors/{k}", self._torch.tensor(flat), step)
            elif isinstance(v, int | float):
                self.writer.add_scalar(named.get(k, f"loss/{k}"), float(v), step)

    def close(self) -> None:
        self.writer.close()


def _flatten(v: Any) -> list:
    return [y for x in v for y in _flatten(x)] if isinstance(v, list) else [v]

"""metrics.jsonl: one JSON object a line (`type`: run | step | epoch), flushed as written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ckd.atomic import atomic_write_text
from ckd.train.tensorboard import TensorBoardLog

METRICS = "metrics.jsonl"


def to_jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends records; `truncate_after(epoch)` drops what a killed run logged past its last
    checkpoint, so a resumed run's file reads like an uninterrupted one."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self.tensorboard: Any = None

    def open_tensorboard(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        """Also write every record to TensorBoard (`ckd.train.tensorboard`), in
        log_dir/<run folder name>; a resumed run purges the events past its checkpoint."""
        if not self.enabled:
            return
        self.tensorboard = TensorBoardLog(log_dir, self.path.parent.name, purge_step)

    def truncate_after(self, epochs_done: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path)
                if r.get("type") == "run" or r.get("epoch", 0) < epochs_done]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: to_jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.record(record)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (or of RUN_DIR/metrics.jsonl)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no metrics file (is this a `ckd train` run folder?)")
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill -9: skip it
                continue
    return out

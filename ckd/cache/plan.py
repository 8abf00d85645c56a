"""What a cache build is about to do, said before it starts: the batch size (chosen to fill
the device on CUDA), and per mentor the rows still to compute, what they take and the
time a short timed warm-up forward predicts."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ckd.data.protocol import TrainingData
from ckd.kernels.sparse_mentors import bytes_per_row
from ckd.models.forward import mentor_forward

from .layout import Layout
from .location import zarr_store
from .mentors import recorded_precision

CPU_BATCH = 512  # the CLI's default before auto sizing; CPU results depend on it
MAX_CUDA_BATCH = 2048  # 1.5x the throughput of 512 on an H200 (README, cache-logits)
CUDA_MEMORY_SHARE = 0.5  # of the device's total memory, for the largest mentor's batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def auto_batch_size(probes: Mapping[str, Callable[[int], Any]], device: torch.device
                    ) -> tuple[int, str]:
    """(batch size, why). CPU: 512. CUDA: the largest power of two up to 2048 whose
    activations, measured on a 64-image forward of each mentor, fit in half the device's
    *total* memory (not the free memory: a resume on the same GPU picks the same batch,
    so the same bytes)."""
    if device.type != "cuda" or not probes:
        return CPU_BATCH, "default"
    total = torch.cuda.get_device_properties(device).total_memory
    per_image = 0.0
    for probe in probes.values():
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe(64)
        _sync(device)
        per_image = max(per_image, (torch.cuda.max_memory_allocated(device) - base) / 64)
    fit = int(CUDA_MEMORY_SHARE * total / max(per_image, 1.0))
    size = min(MAX_CUDA_BATCH, 1 << max(0, fit.bit_length() - 1))
    return size, (f"auto: {per_image / 2**20:.2f} MiB of activations per image, "
                  f"{total / 2**30:.0f} GiB device")


def warmup_rate(probe: Callable[[int], Any], batch: int, device: torch.device,
                budget_s: float = 2.0) -> float:
    """Images/s of a mentor's forward at `batch`: the fastest of up to 6 calls (at least
    3, fewer past `budget_s`); the first calls of a process pay for allocation, thread
    pools and kernel selection, so the best one is the steady state."""
    best, spent = float("inf"), 0.0
    for i in range(6):
        _sync(device)
        t = time.perf_counter()
        probe(batch)
        _sync(device)
        took = time.perf_counter() - t
        spent += took
        if i > 0:
            best = min(best, took)
        if i >= 2 and spent > budget_s:
            break
    return batch / max(best, 1e-9)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(mentors: Mapping[str, dict[str, Any]], num_views: int, num_samples: int,
               batch: int, batch_why: str, device: torch.device) -> list[str]:
    """The plan printed at the start of `cache-logits`. `mentors`: alias -> {arch,
    precision, rows (still to compute), bytes (raw, the whole mentor), rate (img/s of the
    warm-up, or None when nothing is left to compute)}."""
    lines = [f"[cache-logits] plan: {len(mentors)} mentor(s) x {num_views} views x "
             f"{num_samples} images = {num_views * num_samples} rows each; batch {batch} "
             f"({batch_why}) on {device}"]
    total = 0.0
    for alias, m in mentors.items():
        line = (f"  {alias} ({m['arch']}, {m['precision']}): {m['bytes'] / 2**20:.1f} MiB raw, "
                f"{m['rows']} rows to compute")
        if m["rows"] and m.get("rate"):
            eta = m["rows"] / m["rate"]
            total += eta
            line += f", warm-up {m['rate']:,.0f} img/s -> ~{_duration(eta)}"
        elif not m["rows"]:
            line += " (cached)"
        lines.append(line)
    lines.append(f"  estimated mentor time: ~{_duration(total)} (from a timed warm-up batch "
                 "per mentor; writes overlap it)")
    return lines


def plan_build(out: Path, todo: Mapping[str, list[tuple[int, int]]],
          model_of: Callable[[str], torch.nn.Module], layout: Layout,
          dataset: TrainingData,
          images: torch.Tensor | None, batch_size: int | None, dev: torch.device,
          say: bool) -> int:
    """The batch size (`batch_size`, else `plan.auto_batch_size`), and with `say` the plan
    printed: mentors, views, rows, bytes and a timed warm-up's estimate per mentor."""
    attrs = {alias: zarr.open_group(zarr_store(out), path=f"mentors/{alias}", mode="r")
             .attrs.asdict() for alias in todo}

    def probe(alias: str) -> Callable[[int], Any]:
        model, precision = model_of(alias), recorded_precision(attrs[alias])
        res = attrs[alias].get("resolution")
        hw = (res, res) if res else tuple(images.shape[1:3])
        return lambda n: mentor_forward(model, torch.zeros((n, 3, *hw), device=dev), precision)

    why = "given"
    if batch_size is None:
        batch_size, why = auto_batch_size({a: probe(a) for a, u in todo.items() if u}, dev)
        if hasattr(dataset, "batch_size"):  # an image folder's loaders: cut the same way
            dataset.batch_size = batch_size
    if say:
        rows = {a: sum(len(layout.slot_range(i)) * len(layout.sample_range(j)) for i, j in u)
                for a, u in todo.items()}
        itemsize = np.dtype(layout.dtype).itemsize
        warm = batch_size if dev.type == "cuda" else min(batch_size, 64)  # CPU: keep it short
        mentors = {a: {"arch": attrs[a].get("arch"), "precision": recorded_precision(attrs[a]),
                       "rows": rows[a], "rate": warmup_rate(probe(a), warm, dev) if rows[a]
                       else None,
                       "bytes": bytes_per_row(attrs[a].get("logits_mode", "dense"),
                                              layout.num_classes, itemsize)
                       * layout.num_slots * layout.num_samples}
                   for a in todo}
        for line in plan_lines(mentors, layout.num_slots, layout.num_samples, batch_size,
                               why, dev):
            print(line, flush=True)
    return batch_size

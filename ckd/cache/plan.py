"""What a cache build is about to do, said before it starts: the batch size (chosen to fill
the device on CUDA), and per mentor the rows still to compute, what they take and the
time a short timed warm-up forward predicts."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

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

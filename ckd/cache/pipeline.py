"""Keeping the device busy during a cache build (`build_cache`).

What overlaps with what, on CUDA:
- the views of batch k+1 are made on a side stream while batch k's forward runs on the
  main stream (`prefetched`); the forward waits on an event, not on the host;
- logits leave the device by non_blocking copies into pinned host buffers (`HostRows`),
  one event per work unit: the host never waits for a batch, only the writer thread waits
  for its unit's event before reading the buffer;
- a bounded pool of writer threads (`WritePool`) checks, compresses, checksums and writes
  several units at once while the device computes the next ones.

On CPU the same code runs each step in order (no streams, plain copies); the values, and
so the store's bytes, are those of a sequential build. The crash guarantees are the unit
writer's: a unit's marker is written after its chunks by the same task, so a kill -9
with writes in flight leaves units either complete or redone on resume.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def default_writers() -> int:
    """Writer threads of a build: enough to keep several units in flight, few enough to
    leave the cores to the mentor on a small machine."""
    return max(1, min(4, (os.cpu_count() or 1)))


def prefetched(make: Callable[[int], torch.Tensor], starts: Sequence[int],
               device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, make(start)) for each batch start. On CUDA batch k+1's input is made on a
    side stream while the caller runs batch k; the caller's stream waits on an event."""
    if device.type != "cuda" or len(starts) < 2:
        for s in starts:
            yield s, make(s)
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)  # the images and view ids the views read are ready

    def launch(s: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(side):
            x = make(s)
            done = torch.cuda.Event()
            done.record(side)
        return x, done

    nxt = launch(starts[0])
    for i, s in enumerate(starts):
        x, done = nxt
        if i + 1 < len(starts):
            nxt = launch(starts[i + 1])  # queued before batch i's forward: they overlap
        main.wait_event(done)
        x.record_stream(main)  # its memory is not reused before the forward has read it
        yield s, x


class HostRows:
    """A unit's float32 rows on the host: pinned on CUDA, filled by non_blocking copies;
    `ready()` (after the last copy) records the event `wait()` blocks on."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.values = torch.empty(shape, dtype=torch.float32,
                                  pin_memory=device.type == "cuda")
        self.device, self.event = device, None

    def put(self, start: int, rows: torch.Tensor) -> None:
        self.values[start:start + len(rows)].copy_(rows.float(), non_blocking=True)

    def ready(self) -> HostRows:
        if self.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.device))
        return self

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.values


class WritePool:
    """Runs `submit`ted unit writes on `workers` threads, at most `workers` of them queued
    or running while the caller computes the next unit (it blocks beyond that, so host
    memory stays bounded); `workers=0` runs each write in the calling thread (the
    sequential reference). Errors surface in the caller, at the latest on leaving the
    `with` block; leaving it on an error, the writes in flight finish first."""

    def __init__(self, workers: int) -> None:
        self.workers = int(workers)
        self.pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="ckd-cache-write")
                     if self.workers > 0 else None)
        self.pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.pool is None:
            fn(*args)
            return
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.workers:
            self.pending.popleft().result()

    def __enter__(self) -> WritePool:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            while self.pending:  # every write in flight finishes (or raises) first
                future = self.pending.popleft()
                if exc_type is None:
                    future.result()
                else:  # the error already raised is the one to report
                    future.exception()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)

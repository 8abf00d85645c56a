"""CUDA-graph replay of the training step (the building block of a `--cuda-graphs` trainer
mode, which is not wired into `ckd train` yet).

The step from the student's input to the optimizer update (forward, fused loss,
backward, SGD) is captured once per key (learning rate, epoch, batch size) after warm-up
steps and replayed; the views and the cache gather would run eagerly before it (4
launches), the last partial batch and evaluation eagerly. A replay launches the whole
step at once, so a small model's step is no longer bound by the host's ~190 launches.

Capture-safe means: no host sync and no data-dependent shape inside the step (the fused
loss is such; `tests/test_train_graphs.py` checks the step with a dispatch mode), and
every per-step scalar read on the device: the dgkd/TeKAP `step` is a device counter the
captured step increments; the epoch (dkd warm-up) and the learning rate are fixed per
capture, and a new epoch re-captures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

StepFn = Callable[..., dict[str, Tensor]]


class GraphedStep:
    """`step(*inputs) -> dict of device tensors`, replayed from a CUDA graph.

    The first `warmup` calls per key run eagerly on a side stream (real training steps,
    as torch's whole-network capture recipe), the next call captures and replays; later
    calls copy their inputs into the captured buffers and replay. Outputs are the
    graph's static tensors: consume them (stream-ordered) before the next call."""

    def __init__(self, step: StepFn, warmup: int = 3) -> None:
        self.step, self.warmup = step, warmup
        self.key: Any = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[Tensor | None, ...] = ()
        self.static_out: dict[str, Tensor] = {}
        self.eager_calls = 0
        self.replays = 0
        self.captures = 0

    def __call__(self, key: Any, *inputs: Tensor | None) -> dict[str, Tensor]:
        if key != self.key:  # new lr / epoch / shape: warm up and capture again
            self.key, self.graph, self.eager_calls = key, None, 0
        if self.graph is None and self.eager_calls < self.warmup:
            self.eager_calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static_in = tuple(_like(t) for t in inputs)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.step(*self.static_in)
            self.captures += 1
        else:
            for dst, src in zip(self.static_in, inputs, strict=True):
                if dst is not None:
                    dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.static_out


def _like(t: Tensor | None) -> Tensor | None:
    """A capture buffer holding t, with t's row alignment (mentor rows stay padded)."""
    if t is None:
        return None
    if t.dim() == 3 and t.is_floating_point() and not t.is_contiguous():
        from ckd.rows import aligned_rows  # noqa: PLC0415

        return aligned_rows(tuple(t.shape), t.dtype, t.device).copy_(t)
    return t.clone()


def make_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_kw: dict,
                    autocast: Callable, counters: dict[str, Any]) -> StepFn:
    """The capture-safe step: (x, mentor logits | None, labels) -> device outputs.

    `counters["step"]` (if present) is a 0-dim int64 device tensor incremented in the
    step, so a replay draws the dgkd/TeKAP noise of its own step."""
    from ckd.kernels import distill_loss  # noqa: PLC0415

    def step(x: Tensor, mentor: Tensor | None, labels: Tensor) -> dict[str, Tensor]:
        with autocast():
            logits = model(x)
        out = distill_loss(logits, mentor, labels, **loss_kw, **counters)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if isinstance(counters.get("step"), Tensor):
            counters["step"].add_(1)
        return {"loss": out.loss.detach(), "logits": logits.detach(), **out.stats}

    return step

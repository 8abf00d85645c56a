"""CUDA-graph replay of the training step: `ckd train --cuda-graphs`.

The step from the student's input to the optimizer update (forward, fused loss,
backward, SGD) is captured once per batch shape after warm-up steps and replayed; the
views and the cache gather run eagerly before it, the last partial batch and evaluation
eagerly. A replay launches the whole step at once, so a small model's step is no longer
bound by the host's launches.

Capture-safe means: no host sync and no data-dependent shape inside the step (the fused
loss is such; `tests/test_train_graphs.py` checks the step with a dispatch mode), and
every per-step scalar read on the device, so one captured graph replays right for the
whole run: the learning rate is a 0-dim device tensor the optimizer reads (fused SGD's
tensor-lr kernel) and `start_epoch` refills; the epoch (DKD's warm-up) is a device
tensor; the dgkd/TeKAP `step` is a device counter the captured step increments; the
seed is a fixed-width i32 argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ckd.row_align import aligned_rows

StepFn = Callable[..., dict[str, Tensor]]
LossFn = Callable[[Tensor, Any, Tensor, Any], Any]  # (logits, mentor, labels, stats)


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
        if key != self.key:  # a new batch shape: warm up and capture again
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
        return aligned_rows(tuple(t.shape), t.dtype, t.device).copy_(t)
    return t.clone()


def make_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: LossFn,
                    autocast: Callable, step_counter: Tensor | None = None) -> StepFn:
    """The capture-safe step: (x, mentor logits | None, mentor stats | None, labels) ->
    device outputs {"loss", "logits", **loss stats}. `loss(logits, mentor, labels, stats)`
    returns a DistillOutput; `step_counter` (a 0-dim int64 device tensor, the step the
    loss reads) is incremented in the step, so a replay draws the dgkd/TeKAP noise of its
    own step."""

    def step(x: Tensor, mentor: Tensor | None, mentor_stats: Tensor | None,
             labels: Tensor) -> dict[str, Tensor]:
        with autocast():
            logits = model(x)
        out = loss(logits, mentor, labels, mentor_stats)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step_counter is not None:
            step_counter.add_(1)
        return {"loss": out.loss.detach(), "logits": logits.detach(), **out.stats}

    return step


def device_lr(opt: torch.optim.Optimizer, lr: Tensor) -> None:
    """Every parameter group reads its learning rate from `lr` (a 0-dim device tensor)
    through fused SGD's tensor-lr kernel: no host value is baked into a captured step
    (foreach/single-tensor SGD would read a tensor lr with .item(), a host sync)."""
    if not isinstance(opt, torch.optim.SGD):
        raise ValueError("--cuda-graphs captures SGD steps only: use --optimizer sgd, or "
                         "drop --cuda-graphs")
    for group in opt.param_groups:
        group["lr"], group["fused"], group["foreach"] = lr, True, False


class CapturedTraining:
    """A run's --cuda-graphs state: the device scalars, the capture-safe step (the one
    eager steps use too) and its CUDA graph. `start_epoch` sets the epoch's learning rate
    and epoch on the device; `__call__` replays full batches, runs others eagerly."""

    def __init__(self, run: Any, warmup: int = 3) -> None:
        check_capturable(run)
        cfg, device = run.cfg, run.info.device
        self.batch_size = cfg.batch_size
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        self.step_counter = torch.tensor(run.step, dtype=torch.int64, device=device)
        device_lr(run.opt, self.lr)
        plan, seed = run.loss_plan, cfg.seed

        def loss(logits, mentor, labels, stats):  # labels: checked by the kernels' flag
            return plan.loss(logits, mentor, labels, epoch=self.epoch, step=self.step_counter,
                             seed=seed, mentor_stats=stats, validate=False)

        self.step = make_train_step(run.model, run.opt, loss, run.autocast, self.step_counter)
        self.graphed = GraphedStep(self.step, warmup=warmup)
        self.eager_steps = 0

    def start_epoch(self, epoch: int, lr: float) -> None:
        self.lr.fill_(lr)
        self.epoch.fill_(epoch)

    def __call__(self, x: Tensor, mentor: Tensor | None, mentor_stats: Tensor | None,
                 labels: Tensor) -> dict[str, Tensor]:
        if labels.shape[0] != self.batch_size:  # the last partial batch: eager
            self.eager_steps += 1
            return self.step(x, mentor, mentor_stats, labels)
        return self.graphed(tuple(x.shape), x, mentor, mentor_stats, labels)


def check_capturable(run: Any) -> None:
    """What --cuda-graphs cannot capture, refused before the first step with the fix."""
    cfg = run.cfg
    if run.info.device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device (this run is on "
                         f"{run.info.device}); drop --cuda-graphs")
    if run.info.world_size > 1:
        raise ValueError("--cuda-graphs runs one process (DDP's gradient hooks are not "
                         "captured): drop --cuda-graphs or run without torchrun")
    if run.feat.active:
        raise ValueError(f"--cuda-graphs captures logit methods only ({cfg.method} has "
                         "feature terms): drop --cuda-graphs")
    if getattr(getattr(run.source, "cache", None), "sparse", False):
        raise ValueError("--cuda-graphs needs dense mentor logits (this cache holds sparse "
                         "ones): drop --cuda-graphs")

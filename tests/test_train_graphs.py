"""The training step that `ckd train --cuda-graphs` captures is capture-safe: no host sync
and no data-dependent shapes (checked on CPU with a dispatch mode), its device step
counter draws the same dgkd/TeKAP keys as the eager step's integers, and (on a GPU) the
replayed steps give the eager steps' weights."""

from __future__ import annotations

import copy

import pytest
import torch
from device import DEVICE, ON_GPU
from torch.utils._python_dispatch import TorchDispatchMode

from ckd.models import create_model
from ckd.train.graphs import GraphedStep, make_train_step

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "item"}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _setup(method, M=3, B=8, C=10, seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=C).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(B, 3, 32, 32, generator=g).to(DEVICE),
                (3 * torch.randn(M, B, C, generator=g)).half().to(DEVICE),
                torch.randint(0, C, (B,), generator=g).to(DEVICE)) for _ in range(3)]
    kw = dict(method=method, backend="triton", validate=False)
    return model, opt, batches, kw


@pytest.mark.parametrize("method", ["classroom", "dgkd"])
def test_step_has_no_host_sync(method):
    model, opt, batches, kw = _setup(method)
    counters = {"step": torch.zeros((), dtype=torch.int64, device=DEVICE), "seed": 3} \
        if method == "dgkd" else {}
    step = make_train_step(model, opt, kw, _no_autocast, counters)
    step(*batches[0])  # first step creates the momentum buffers
    with Ops() as ops:
        out = step(*batches[1])
    assert not SYNC_OPS & ops.names, SYNC_OPS & ops.names
    assert set(out) >= {"loss", "logits", "nonfinite", "mentor_rank"}
    if method == "dgkd":
        assert int(counters["step"]) == 2


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def test_device_step_counter_equals_integer_steps():
    model, opt, batches, kw = _setup("dgkd")
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    counters = {"step": torch.zeros((), dtype=torch.int64, device=DEVICE), "seed": 3}
    step = make_train_step(model, opt, kw, _no_autocast, counters)
    for i, batch in enumerate(batches):
        step(*batch)
        eager = make_train_step(twin, twin_opt, kw, _no_autocast, {"step": i, "seed": 3})
        eager(*batch)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (CKD_TEST_DEVICE=cuda)")
def test_graph_replay_equals_eager_steps():
    model, opt, batches, kw = _setup("classroom")
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    graphed = GraphedStep(make_train_step(model, opt, kw, _no_autocast, {}), warmup=2)
    eager = make_train_step(twin, twin_opt, kw, _no_autocast, {})
    for batch in batches * 2:
        graphed(("lr", 0.05), *batch)
        eager(*batch)
    assert graphed.captures == 1 and graphed.replays == len(batches) * 2 - 2
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


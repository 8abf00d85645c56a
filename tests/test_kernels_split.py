"""Long rows split across programs (ckd/kernels/split_rows.py), in the Triton interpreter at
small shapes: the split threshold is lowered through the plan's `split_chunk`, so a row of
a few hundred classes takes several programs, each an online-softmax partial over its
class range, merged by the row's last program in a fixed order. Against the eager
reference (held to tests/error_bound.py's bound), run to run bit for bit, and the launch
it makes."""

from __future__ import annotations

import functools

import pytest
import torch
from device import ON_GPU
from test_kernels_triton import CLASSROOM, OTHERS, _id, compare, safe_inputs

from ckd.kernels import launch
from ckd.kernels.specialize import recorded_launches
from ckd.kernels.split_rows import split_plan
from ckd.methods import distill_loss

SPLIT = [CLASSROOM[0], dict(method="classroom", delta=0.5), CLASSROOM[1], OTHERS[1],
         OTHERS[2], OTHERS[3], OTHERS[4], dict(method="nokd")]


@pytest.fixture
def split_rows(monkeypatch):
    """Every fused loss of the test runs with rows split into ranges of `chunk` classes."""
    def use(chunk: int, block_c: int | None = None):
        monkeypatch.setattr(launch, "fused_loss", functools.partial(
            _ORIG, split_chunk=chunk, block_c=block_c))
    return use


_ORIG = launch.fused_loss


@pytest.mark.parametrize("kw", SPLIT, ids=_id)
def test_split_rows_match_the_reference(kw, split_rows):
    split_rows(64)  # C = 300: 5 programs a row, the last range partial
    compare(*safe_inputs(kw, B=4, C=300, M=3), kw)


@pytest.mark.parametrize("chunk,block_c", [(32, 16), (512, None), (16, 16)])
def test_split_shapes_and_one_sample(chunk, block_c, split_rows):
    """Ranges of several class blocks, one range a row, and a batch of one sample."""
    split_rows(chunk, block_c)
    kw = dict(method="aver", tau=6.0)
    compare(*safe_inputs(kw, B=3, C=70, M=2), kw)
    compare(*safe_inputs(kw, B=1, C=37, M=2), kw)


def test_split_is_bit_identical_run_to_run_and_launches_once(split_rows):
    split_rows(64)
    zs, zm, y = safe_inputs(OTHERS[4], B=4, C=300, M=2)
    outs = []
    for _ in range(2):
        z = zs.clone().requires_grad_()
        out = distill_loss(z, zm, y, backend="triton", **OTHERS[4])
        out.loss.backward()
        outs.append((out.loss.detach(), z.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with recorded_launches() as calls:
        distill_loss(zs.clone().requires_grad_(), zm, y, backend="triton", **OTHERS[4])
    (kernel, grid, _args, kwargs), = calls
    assert kernel.__name__ == "_split_kernel"
    assert kwargs["SPLIT"] == 5 and grid == (4 * 5,) and kwargs["CHUNK"] == 64


def test_per_sample_ranking_keeps_the_three_pass_path(split_rows):
    split_rows(64, 64)
    kw = dict(method="classroom", granularity="sample")
    zs, zm, y = safe_inputs(kw, B=2, C=300, M=2)
    with recorded_launches() as calls:
        distill_loss(zs.clone().requires_grad_(), zm, y, backend="triton", **kw)
    assert [c[0].__name__ for c in calls] == ["_terms_kernel"]
    assert calls[0][3]["ONE_BLOCK"] is False


def test_split_plan_fills_the_gpu():
    """By default a long row is split until a launch has ~4096 programs, ranges >= 2
    blocks: kd at B=4096 keeps a program a row, classroom at B=1024 takes 4."""
    assert split_plan(4096, 32000, 1024, None, 4096) == (1, 32768)
    assert split_plan(1024, 32000, 1024, None, 4096) == (4, 8192)
    assert split_plan(16, 32000, 1024, None, 4096) == (11, 3072)
    assert split_plan(4, 300, 64, 64, 4096) == (5, 64)


@pytest.mark.parametrize("sdtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ON_GPU, reason="the interpreter (triton 3.9) truncates fp32 -> bf16 casts toward "
        "zero where compiled code rounds to nearest: a bf16 gradient 1 ulp off")),
    torch.float16], ids=str)
def test_split_half_precision_students(sdtype, split_rows):
    """bf16 / fp16 students over fp16 mentors (the amp path): fp32 accumulation, the
    fp16 gradient scaled out of place."""
    from test_kernels_triton import inputs

    split_rows(64)
    compare(*inputs(B=3, C=200, M=2, sdtype=sdtype, mdtype=torch.float16), OTHERS[1])

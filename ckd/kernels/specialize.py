"""Compile the loss kernels for a GPU without a GPU, specialized exactly as a launch would
specialize them (ints equal to 1 become constants, ints and pointers divisible by 16 get
alignment hints), with the ptxas bundled in triton. Nothing runs: `launch.run` is replaced
by a recorder, and the inputs are empty tensors laid out as the trainer's (student rows
contiguous, mentor rows padded to 16 bytes as the cache gathers them, mentor statistics
passed). The interpreter the CPU tests use never specializes, so a kernel that does not
compile for a batch of one sample is only caught here (tests/test_kernels_compile.py).

Run with TRITON_INTERPRET unset (the kernels must be JIT functions).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ckd.kernels.api import terms_loss
from ckd.row_align import aligned_rows


@contextmanager
def recorded_launches():
    """Replace launch.run by a recorder: yields the list of (kernel, grid, args, kwargs)."""
    from ckd.kernels import launch  # noqa: PLC0415 - needs triton

    calls: list = []
    saved = launch.run
    launch.run = lambda kernel, grid, args, kwargs: calls.append((kernel, grid, args, kwargs))
    try:
        yield calls
    finally:
        launch.run = saved


def training_inputs(B: int, C: int, M: int, student=torch.float32, mentor=torch.float16,
                    device="cpu", fill: bool = False):
    """(student [B, C], mentors [M, B, C] with 16-byte rows, labels [B], mentor stats
    [M, B, 2]) as the trainer hands them to the loss. `fill=False`: uninitialized (for
    compiling: no page is touched, so large shapes cost nothing)."""
    zs = torch.empty(B, C, dtype=student, device=device)
    zm = aligned_rows((M, B, C), mentor, device)
    if fill:
        zs.normal_()
        zm.normal_()
    y = torch.zeros(B, dtype=torch.int64, device=device)
    stats = torch.zeros(M, B, 2, dtype=torch.float32, device=device)
    return zs.requires_grad_(), zm, y, stats


def loss_calls(table, B: int, C: int, M: int, student=torch.float32, mentor=torch.float16,
               backward: bool = True, inputs=None, **counters) -> list:
    """The launches of one `terms_loss(table)` forward (+ backward), recorded."""
    zs, zm, y, stats = inputs or training_inputs(B, C, M, student, mentor)
    with recorded_launches() as calls:
        out = terms_loss(zs, zm, y, table, validate=False, mentor_stats=stats, **counters)
        if backward:
            out.loss.backward()
    return calls


def _bind(call, arch: int):
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415 - needs triton
    from triton.compiler import make_backend  # noqa: PLC0415 - needs triton
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415 - needs triton

    kernel, _grid, args, kwargs = call
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    return kernel, target, backend, bound, spec, options


def spec_key(call, arch: int = 90) -> tuple:
    """Triton's compile-cache key of a recorded launch (what a CUDA launch compiles on)."""
    kernel, _t, _b, _bound, spec, options = _bind(call, arch)
    return kernel.__name__, str(spec), str(options)


def compile_launch(call, arch: int = 90):
    """triton.compile of one recorded launch for sm_<arch>, specialized as JIT would."""
    import triton  # noqa: PLC0415 - needs triton
    from triton.compiler import ASTSource  # noqa: PLC0415 - needs triton

    kernel, target, backend, bound, spec, options = _bind(call, arch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, call[3], bound, spec,
                                                              options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)

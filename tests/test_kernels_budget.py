"""What the fused loss costs the GPU, checked on CPU: launches per loss forward+backward,
no host sync, no recompiles across training steps (the per-step keys are device tensors
or fixed-width arguments), fp16 gradients kept in fp32 until scaled, mentor statistics
from the cache, and the in-place backward scale (upstream 1: no memory traffic)."""

from __future__ import annotations

import pytest
import torch
from device import DEVICE
from registry_cases import method_cases, table_of
from torch.utils._python_dispatch import TorchDispatchMode

from ckd.kernels import Ranking, TermTable
from ckd.kernels import launch as F
from ckd.kernels.specialize import recorded_launches
from ckd.methods import distill_loss, get_method
from ckd.row_align import aligned_rows

CASES = method_cases()

# aten ops that allocate or re-view memory: no kernel launch on a GPU
NO_LAUNCH = {"empty.memory_format", "empty_strided.default", "detach.default", "view.default",
             "select.int", "slice.Tensor", "alias.default", "expand.default",
             "as_strided.default", "_to_copy.default_cpu_only"}


class AtenLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.__name__}" if "." in func.__name__ else str(func))
        return func(*args, **(kwargs or {}))


def _inputs(B=8, C=20, M=3, sdtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    zs = (torch.randn(B, C, generator=g) + 2 * torch.nn.functional.one_hot(y, C)).to(sdtype)
    zm = aligned_rows((M, B, C), torch.float16, DEVICE)
    zm.copy_(2 * torch.randn(M, B, C, generator=g) + 3 * torch.nn.functional.one_hot(y, C))
    zs, y = zs.to(DEVICE), y.to(DEVICE)
    return zs, zm, y, F.mentor_row_stats(zm, y)


@pytest.mark.parametrize("case", list(CASES))
def test_at_most_three_launches_per_forward_backward(case):
    zs, zm, y, st = _inputs()
    z = zs.clone().requires_grad_()
    out = distill_loss(z, zm, y, backend="triton", validate=False, mentor_stats=st,
                       **CASES[case])  # warm-up (constant tables are built once)
    grad_out = torch.ones((), device=DEVICE)
    with recorded_launches() as calls, AtenLog() as log:
        out = distill_loss(z, zm, y, backend="triton", validate=False, mentor_stats=st,
                           **CASES[case])
        torch.autograd.grad(out.loss, z, grad_out)  # as into a layer: no .grad accumulation
    launching = [op for op in log.ops if op not in NO_LAUNCH]
    names = [c[0].__name__ for c in calls]
    assert len(calls) + len(launching) <= 3, (names, launching)
    table = table_of(CASES[case], zm.shape[0])
    batch_ranking = isinstance(table, TermTable) and isinstance(table.select, Ranking) \
        and not table.select.per_sample  # the ranking kernel runs before the loss kernel
    assert len(calls) == 2 + batch_ranking and names[-1] == "_scale_kernel", names


def test_no_host_sync_in_forward_backward():
    # a host sync on CUDA is an .item()/bool()/nonzero on a device tensor: none may run
    zs, zm, y, st = _inputs()
    z = zs.clone().requires_grad_()
    with AtenLog() as log:
        for case in CASES:
            out = distill_loss(z, zm, y, backend="triton", validate=False, mentor_stats=st,
                               **CASES[case])
            out.loss.backward()
    assert not {"_local_scalar_dense.default", "nonzero.default", "item.default"} & set(log.ops)


def _spec_keys(kernel_calls):
    """Triton's compile-cache key of each launch, as a CUDA launch would compute it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    try:  # triton >= 3.5; older releases bind arguments differently
        from triton.runtime.jit import create_function_from_signature
    except ImportError:
        pytest.skip("this triton has no create_function_from_signature")

    from ckd.kernels import triton_kernels as D

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys = []
    for kernel, _grid, args, kwargs in kernel_calls:
        fn = getattr(kernel, "fn", kernel)
        dns = D.UNSPECIALIZED if fn.__name__ == "_terms_kernel" else None
        jf = kernel if isinstance(kernel, JITFunction) else JITFunction(fn, do_not_specialize=dns)
        binder = create_function_from_signature(jf.signature, jf.params, backend)
        _bound, spec, options = binder(*args, **kwargs)
        keys.append((kernel.__name__, str(spec), str(options)))
    return keys


@pytest.mark.parametrize("case", [c for c, kw in CASES.items()
                                  if set(kw) & {"step", "epoch"} or "sample" in c])
def test_no_recompile_across_steps(case):
    """The kernel's specialization (Triton's compile-cache key) is the same at every step,
    for keys that take i32 and i64-sized values and dgkd masks that keep 1..M mentors."""
    zs, zm, y, st = _inputs(M=4)
    z = zs.clone().requires_grad_()
    keys = set()
    for step, seed in [(0, 0), (1, 7), (2**31 + 5, 2**33 + 1), (12345, 3), (2**40, 2)]:
        kw = {k: v for k, v in CASES[case].items() if k not in ("seed", "step", "epoch")}
        ctx = {k: v for k, v in dict(step=step, seed=seed, epoch=step % 40).items()
               if k in CASES[case]}
        with recorded_launches() as calls:
            distill_loss(z, zm, y, backend="triton", validate=False, mentor_stats=st,
                         **kw, **ctx).loss.backward()
        keys.add(tuple(_spec_keys(calls)))
    assert len(keys) == 1


@pytest.mark.parametrize("method", sorted({kw["method"] for kw in CASES.values()
                                           if set(kw) & {"step", "epoch"}}))
def test_step_and_epoch_as_device_tensors(method):
    """CUDA-graph capture: the step/epoch read on the device give the int path's result."""
    zs, zm, y, _ = _inputs(M=4)
    for value in (0, 3, 11, 40):
        counters = get_method(method).counters
        ctx = {k: v for k, v in dict(epoch=value, step=value, seed=5).items() if k in counters}
        ctx_t = {k: torch.tensor(v, device=DEVICE) if k != "seed" else v for k, v in ctx.items()}
        outs = []
        for c in (ctx, ctx_t):
            z = zs.clone().requires_grad_()
            out = distill_loss(z, zm, y, method=method, backend="triton", **c)
            out.loss.backward()
            outs.append((out, z.grad))
        (a, ga), (b, gb) = outs
        assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
        for k in ("mentor_rank", "mentor_active", "mentor_temp", "student_rank"):
            assert torch.equal(a.stats[k], b.stats[k]), k
        ref = distill_loss(zs, zm, y, method=method, backend="reference", **ctx)
        torch.testing.assert_close(a.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.stats["mentor_rank"], ref.stats["mentor_rank"])


def test_fp16_gradient_stays_fp32_until_scaled():
    # grad/B of small probabilities underflows fp16 (min subnormal 6e-8) unless it is kept
    # in fp32 until GradScaler's 65536 is applied; 65536 itself must not become fp16 inf
    B, C = 1024, 10
    zs, zm, y, st = _inputs(B=B, C=C, M=2, sdtype=torch.float16)
    scale = 65536.0
    z = zs.clone().requires_grad_()
    (distill_loss(z, zm, y, method="aver", backend="triton", mentor_stats=st).loss
     * scale).backward()
    z32 = zs.float().requires_grad_()
    (distill_loss(z32, zm, y, method="aver", backend="reference").loss * scale).backward()
    assert z.grad.dtype == torch.float16 and torch.isfinite(z.grad).all()
    expect = z32.grad.to(torch.float16)
    assert (expect != 0).float().mean() > 0.9  # representable after scaling
    atol = 2e-3 * float(expect.float().abs().max())  # cancellation in small entries
    torch.testing.assert_close(z.grad.float(), expect.float(), rtol=2e-3, atol=atol)


def test_backward_scale_in_place_twice_and_stats_only():
    zs, zm, y, st = _inputs()
    z = zs.clone().requires_grad_()
    out = distill_loss(z, zm, y, method="classroom", backend="triton", mentor_stats=st)
    (g1,) = torch.autograd.grad(out.loss, z, torch.tensor(3.0, device=DEVICE), retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(out.loss, z, torch.tensor(3.0, device=DEVICE), retain_graph=True)
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    (g3,) = torch.autograd.grad(out.loss, z, torch.tensor(1.0, device=DEVICE))
    torch.testing.assert_close(g3 * 3.0, g1, rtol=1e-6, atol=0)
    # the flag output alone needs no gradient (set_materialize_grads(False))
    out = distill_loss(z, zm, y, method="aver", backend="triton")
    assert out.stats["nonfinite"].grad_fn is None or not out.stats["nonfinite"].requires_grad


def test_mentor_stats_argument():
    zs, zm, y, st = _inputs(M=3)
    for gran in ("batch", "sample"):
        a = distill_loss(zs, zm, y, granularity=gran, backend="triton", mentor_stats=st)
        b = distill_loss(zs, zm, y, granularity=gran, backend="triton")  # computed here
        assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="mentor_stats must be float32"):
        distill_loss(zs, zm, y, backend="triton", mentor_stats=st[:2])


def test_aligned_rows_give_128_bit_width():
    zm = aligned_rows((6, 5, 100), torch.float16, "cpu")
    assert zm.shape == (6, 5, 100) and zm.stride(1) == 104
    assert F.vec_width(zm, 100) == 8
    assert F.vec_width(torch.empty(6, 5, 100, dtype=torch.float16), 100) == 1
    assert F.vec_width(torch.empty(5, 100), 100) == 4  # fp32 rows of 400 bytes
    assert F.vec_width(torch.empty(5, 200, dtype=torch.float16)[:, 3:103], 100) == 1


def test_kernel_and_view_tests_import_no_cache_or_loader_packages():
    """gpu_check.sh runs these tests on machines without zarr/ffcv (e.g. torch 2.11)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    code = (f"import sys; sys.path.insert(0, {str(tests)!r})\n"
            "import test_kernels_triton, test_kernels_budget, test_kernels_reference, "
            "test_views_fused, ckd.kernels.launch, ckd.kernels.specialize, ckd.data.views\n"
            "bad = {'zarr', 'ffcv', 'numcodecs'} & set(sys.modules)\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_kernels_are_a_leaf():
    """ckd/kernels knows tensors and numbers: no import of the methods, the cache, the data,
    the trainer or the models (checked on the source: lazy imports count too)."""
    import re
    from pathlib import Path

    import ckd.kernels

    layer = re.compile(r"^\s*(?:from|import)\s+ckd\.(methods|cache|data|train|models|cli|aid)\b",
                       re.M)
    bad = {p.name: layer.findall(p.read_text())
           for p in Path(ckd.kernels.__file__).parent.glob("*.py")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_launch_plan_is_built_once_per_shape():
    """The host cost of a step: the second call with the same table, shapes and dtypes
    finds its plan (and its method's resolved table) cached; another batch size builds one
    more."""
    from ckd.methods import loss as method_loss

    zs, zm, y, st = _inputs(B=8)
    z = zs.clone().requires_grad_()
    for _ in range(2):
        distill_loss(z, zm, y, method="classroom", backend="triton", mentor_stats=st)
        sizes = (len(F._PLANS), len(method_loss._TABLES))
    distill_loss(z, zm, y, method="classroom", backend="triton", mentor_stats=st)
    assert (len(F._PLANS), len(method_loss._TABLES)) == sizes
    distill_loss(z[:4], zm[:, :4], y[:4], method="classroom", backend="triton",
                 mentor_stats=st[:, :4])
    assert len(F._PLANS) == sizes[0] + 1

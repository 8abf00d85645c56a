"""`benchmarks/cache.py --build`: does a cache build cost what its mentor forwards cost?

For each mentor, side by side in one run (alternating, best of --reps: the machine may be
shared), the bare forward -- `ckd.cache.mentors.mentor_forward` at the build's precision
and batch size over as many images as the build computes (its train rows and test
images), inputs made once on the device, no views, no I/O -- and the full `build_cache`
of that mentor alone (store set-up, checkpoint hash and load, views, forwards, checks,
compression, checksums, writes, test accuracy). Prints the ratio per mentor and in total,
where the build's extra time goes (views, and the writer threads' busy time, which
overlaps the forwards) and the peak memory. Mentors have random weights (speed only); the
data is synthetic, CIFAR-100 shaped (BN statistics set by one training-mode pass over
it, so that logits have a trained mentor's magnitude and fit fp16).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

CLASSROOM = ["resnet110", "resnet8", "resnet14", "ShuffleV2", "MobileNetV2", "ShuffleV1"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_forward_s(model: torch.nn.Module, rows: int, batch: int, precision: str,
                   dev: torch.device, hw: tuple[int, int]) -> float:
    """Seconds of `rows` images through the mentor forward, in `batch`-sized pieces."""
    from ckd.models.forward import mentor_forward

    x = torch.randn(batch, 3, *hw, device=dev)
    mentor_forward(model, x, precision)  # warm-up (allocation, kernel choice)
    _sync(dev)
    t = time.perf_counter()
    for s in range(0, rows, batch):
        mentor_forward(model, x[:min(batch, rows - s)], precision)
    _sync(dev)
    return time.perf_counter() - t


class _Timers:
    """Time spent in the build's views and in its writer threads (patched in for the
    benchmark only; both are plain function calls inside build_cache)."""

    def __init__(self) -> None:
        import ckd.cache.writer as writer
        import ckd.data.views as views

        self.views_s = self.write_s = 0.0
        self._views, self._write = views, writer.UnitWriter
        self._apply, self._unit_write = views.apply_views, writer.UnitWriter.write

    def _timed(self, fn: Callable, field: str) -> Callable:
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t)
        return run

    def __enter__(self) -> _Timers:
        self._views.apply_views = self._timed(self._apply, "views_s")
        self._write.write = self._timed(self._unit_write, "write_s")
        return self

    def __exit__(self, *exc) -> None:
        self._views.apply_views, self._write.write = self._apply, self._unit_write


def build_bench(say: Callable[[str], None], *, archs: list[str], n: int, n_test: int,
                views: int, batch: int | None, precision: str, device: str, dtype: str,
                reps: int) -> None:
    from ckd.cache import build_cache
    from ckd.cache.mentors import load_mentor
    from ckd.cache.plan import auto_batch_size
    from ckd.data import apply_views, load_dataset
    from ckd.models import create_model, save_checkpoint

    dev = torch.device(device)
    ds = load_dataset("synthetic", n_train=n, n_test=n_test, num_classes=100)
    hw = tuple(ds.train.images.shape[1:3])
    tmp = Path(tempfile.mkdtemp(prefix="ckd-build-bench-"))
    rows = n * views + n_test  # what the build runs through each mentor
    try:
        paths = {}
        x = apply_views(torch.from_numpy(ds.train.images[:256]), torch.zeros(
            min(256, n), dtype=torch.int64), ds.mean, ds.std)
        for k, arch in enumerate(archs):
            torch.manual_seed(k)
            model = create_model(arch, 100)
            for bn in model.modules():  # BN statistics of the data (one cumulative pass):
                if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):  # logits of a
                    bn.reset_running_stats()  # sane size (random deep nets overflow fp16)
                    bn.momentum = None
            with torch.no_grad():
                model.train()(x)
            paths[arch] = tmp / f"{arch}.pt"
            save_checkpoint(paths[arch], model.eval(), arch=arch, num_classes=100,
                            dataset=ds.name, metrics={})
        models = {a: load_mentor(a, p, 100, dev) for a, p in paths.items()}
        if batch is None:
            from ckd.models.forward import mentor_forward

            def probe(model: torch.nn.Module) -> Callable[[int], object]:
                return lambda b: mentor_forward(model, torch.zeros(b, 3, *hw, device=dev),
                                                precision)

            probes = {a: probe(m) for a, m in models.items()}
            batch, why = auto_batch_size(probes, dev)
        else:
            why = "given"
        say(f"\n## Build vs bare mentor forwards ({device}, precision {precision}, batch "
            f"{batch} ({why}), dtype {dtype})\n")
        say(f"{n} synthetic CIFAR-100-shaped images x {views} keyed views + {n_test} test "
            f"images = {rows} mentor-images per mentor; best of {reps}, alternating; "
            f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, load "
            f"average {os.getloadavg()[0]:.2f}\n")
        say("| mentor | bare forward s | build_cache s | ratio | bare img/s | build img/s | "
            "views s | writer threads busy s | peak device MiB |")
        say("|---|---|---|---|---|---|---|---|---|")
        tot_bare = tot_build = 0.0
        for arch in archs:
            bare, built, parts = [], [], []
            peak = 0.0
            for r in range(reps):
                bare.append(bare_forward_s(models[arch], rows, batch, precision, dev, hw))
                out = tmp / f"c-{arch}-{r}"
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                with _Timers() as timers:
                    t = time.perf_counter()
                    build_cache(ds, {arch: paths[arch]}, out, views=views, batch_size=batch,
                                device=device, dtype=dtype, precision=precision,
                                progress=False)
                    built.append(time.perf_counter() - t)
                if dev.type == "cuda":
                    peak = max(peak, torch.cuda.max_memory_allocated(dev) / 2**20)
                parts.append((timers.views_s, timers.write_s))
                shutil.rmtree(out, ignore_errors=True)
            b, w = min(bare), min(built)
            v, ws = parts[built.index(w)]
            tot_bare, tot_build = tot_bare + b, tot_build + w
            say(f"| {arch} | {b:.2f} | {w:.2f} | {w / b:.2f}x | {rows / b:,.0f} | "
                f"{rows / w:,.0f} | {v:.2f} | {ws:.2f} | "
                f"{f'{peak:.0f}' if dev.type == 'cuda' else '-'} |")
        say(f"| **total** | {tot_bare:.2f} | {tot_build:.2f} | **{tot_build / tot_bare:.2f}x** "
            f"| {rows * len(archs) / tot_bare:,.0f} | {rows * len(archs) / tot_build:,.0f} "
            "| | | |")
        say(f"\npeak host memory (max RSS of this process): "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

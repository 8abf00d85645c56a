"""Student accuracy from dense, topk:K and sample:S mentor logits on a 100-class synthetic task.

    .venv/bin/python scripts/sparse_synthetic.py [--seeds 0,1,2] [--threads 2]
        [--methods "kd T=4,classroom tau=4"] [--modes dense,sample:8] [--trace]

The task where sparsity bites (100 classes) at a size the shared 2-core CPU runs in minutes:
points, not images. 100 Gaussian classes in 32 dimensions, grouped as 20 superclasses of 5
(classes of a superclass overlap, so the mentors' soft targets carry real "dark knowledge";
the mentors reach about 64 % test top-1),
2000 training points (20 per class), 5000 test points, all generated from a fixed seed.

Three MLP mentors (a teacher and two peers) are trained on it once (cross-entropy, fresh
jitter each epoch). Their logits are then "cached" for V keyed views (view v = the training
points plus a fixed jitter of seed v; student epoch e reads view e, as with
`ckd cache-logits --views V`): as fp16 dense rows, and through the same functions the cache
writer uses for `--logits topk:K` (`sparsify_topk`) and `--logits sample:S`
(`sparsify_sample`, draws seeded per view). Students (a small MLP) then train from each with
the trainer's loss (`make_plan(...).loss`, the eager reference backend: nokd, kd at T=4 and
T=1, classroom at tau=4), 3 seeds each, and the table of test top-1 (last and best epoch,
mean +- std) is printed. What differs from `ckd train --cache`: the rows live in memory
instead of a Zarr store (the store round-trips them exactly: tests/test_cache_sparse.py),
and the models are MLPs on points instead of CNNs on images.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from torch import nn

C, DIM, SUPER = 100, 32, 20
N_TRAIN, N_TEST = 2000, 5000
SUPER_SD, CLASS_SD, NOISE_SD, JITTER_SD = 3.0, 0.35, 1.0, 0.5
MENTORS = (("teacher", (256, 256), 0), ("peer1", (128,), 1), ("peer2", (128,), 2))
STUDENT = (64,)
MENTOR_EPOCHS, STUDENT_EPOCHS, BATCH, LR = 30, 20, 128, 0.05
MODES = ("dense", "topk:5", "sample:8")
# label, method expression, parameters (make_plan's params / shortcuts)
METHODS = (("nokd", "nokd", {}), ("kd T=4", "kd", {"T": 4.0}), ("kd T=1", "kd", {"T": 1.0}),
           ("classroom tau=4", "classroom", {"tau": 4.0, "variant": "paper"}))
EXTRA_METHODS = (("kd T=5", "kd", {"T": 5.0}),
                 ("classroom tau=1", "classroom", {"tau": 1.0, "variant": "paper"}))


def make_task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), deterministic: seed 0."""
    rng = np.random.default_rng(0)
    supers = rng.normal(size=(SUPER, DIM)) * SUPER_SD
    means = supers[np.arange(C) // (C // SUPER)] + rng.normal(size=(C, DIM)) * CLASS_SD

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.permutation(np.arange(n) % C)
        x = means[y] + rng.normal(size=(n, DIM)) * NOISE_SD
        return torch.from_numpy(x).float(), torch.from_numpy(y).long()

    return (*split(N_TRAIN), *split(N_TEST))


def view(x: torch.Tensor, v: int) -> torch.Tensor:
    """View v of the training points: a fixed jitter (the cache's keyed view v)."""
    g = torch.Generator().manual_seed(1000 + v)
    return x + torch.randn(x.shape, generator=g) * JITTER_SD


def mlp(hidden: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [], DIM
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, C))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def fit(model: nn.Module, epochs: int, seed: int, batch_loss) -> list[float]:
    """SGD (momentum 0.9, wd 5e-4, cosine lr from LR) over `epochs`; `batch_loss(model,
    epoch, step, idx)` gives a batch's loss; returns the test accuracy after each epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    step, accs = 0, []
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        model.train()
        for idx in torch.randperm(N_TRAIN, generator=g).split(BATCH):
            loss = batch_loss(model, epoch, step, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        accs.append(accuracy(model, *TEST))
    return accs


def rows(mentors, idx: torch.Tensor):
    """Rows `idx` of dense [M, N, C] logits or of SparseMentors (what a cache gather gives)."""
    if isinstance(mentors, torch.Tensor):
        return mentors.index_select(1, idx)
    from ckd.kernels.sparse_mentors import SparseMentors

    return SparseMentors(*(getattr(mentors, k).index_select(1, idx) for k in
                           ("ids", "logits", "counts", "lse", "true_logp", "rest_lse",
                            "rest_mean")), mentors.modes, mentors.num_classes)


def cached_views(mentors: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                 modes: list[str]) -> dict:
    """mode -> one entry per view: fp16 [M, N, C] (dense) or SparseMentors."""
    from ckd.kernels.sparse_mentors import parse_mode, sparsify_sample, sparsify_topk

    out: dict[str, list] = {m: [] for m in modes}
    for v in range(STUDENT_EPOCHS):
        xv = view(x, v)
        with torch.no_grad():
            z = torch.stack([m.eval()(xv) for m in mentors]).half()  # as the cache stores
        for spec in modes:
            mode, n = parse_mode(spec, C)
            out[spec].append(z if mode == "dense" else sparsify_topk(z, y, n) if mode == "topk"
                             else sparsify_sample(z, y, n, torch.Generator().manual_seed(v)))
    return out


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(m[0] for m in METHODS),
                    help="labels, of: " + ", ".join(m[0] for m in METHODS + EXTRA_METHODS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--trace", action="store_true",
                    help="per epoch: test top-1, mean loss and mean mentor temperature")
    args = ap.parse_args(argv)
    by_label = {m[0]: m for m in METHODS + EXTRA_METHODS}
    methods = [by_label[label.strip()] for label in args.methods.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    from ckd.methods.compose import make_plan

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    x, y, *test = make_task()
    TEST[:] = test
    ce = nn.functional.cross_entropy
    mentors, mentor_acc = [], {}
    for name, hidden, seed in MENTORS:
        model = mlp(hidden, seed)
        jitter = torch.Generator().manual_seed(10_000 + seed)

        def mentor_loss(model, epoch, step, idx, jitter=jitter):
            xb = x[idx] + torch.randn(len(idx), DIM, generator=jitter) * JITTER_SD
            return ce(model(xb), y[idx])

        mentor_acc[name] = fit(model, MENTOR_EPOCHS, seed, mentor_loss)[-1]
        mentors.append(model)
        print(f"mentor {name} {hidden}: test top-1 {mentor_acc[name]:.2f}%", flush=True)
    caches = cached_views(mentors, x, y, sorted(set(modes) | {"dense"}))
    views = [view(x, v) for v in range(STUDENT_EPOCHS)]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for label, method, params in methods:
        plan = make_plan(method, {k: v for k, v in params.items() if k == "T"}, None,
                         {k: v for k, v in params.items() if k != "T"}, backend="reference")
        for spec in ("dense",) if method == "nokd" else modes:
            for seed in seeds:
                trace: list[list[float]] = [[0.0, 0.0, 0] for _ in range(STUDENT_EPOCHS)]

                def student_loss(model, epoch, step, idx, spec=spec, seed=seed, plan=plan,
                                 method=method, trace=trace):
                    zm = None if method == "nokd" else rows(caches[spec][epoch], idx)
                    out = plan.loss(model(views[epoch][idx]), zm, y[idx], epoch=epoch,
                                    step=step, seed=seed)
                    temp = out.stats.get("mentor_temp")
                    trace[epoch][0] += float(out.loss)
                    trace[epoch][1] += float(temp.float().mean()) if temp is not None else 0.0
                    trace[epoch][2] += 1
                    return out.loss

                accs = fit(mlp(STUDENT, 100 + seed), STUDENT_EPOCHS, seed, student_loss)
                if args.trace:
                    for e, (loss, temp, n) in enumerate(trace):
                        print(f"  {label} {spec} seed {seed} epoch {e}: test top-1 "
                              f"{accs[e]:.2f}%, mean loss {loss / n:.2f}, mean mentor "
                              f"temperature {temp / n:.2f}", flush=True)
                results.setdefault((label, spec), []).append((accs[-1], max(accs)))
                print(f"{label} from {spec} seed {seed}: last {accs[-1]:.2f}% best "
                      f"{max(accs):.2f}%", flush=True)
    lines = [f"Synthetic 100-class points ({N_TRAIN} train, {N_TEST} test, {SUPER} superclasses "
             f"of {C // SUPER}); student MLP {DIM}-{'-'.join(map(str, STUDENT))}-{C}, "
             f"{STUDENT_EPOCHS} epochs (one cached view each), seeds {seeds}; mentors (test "
             "top-1): " + ", ".join(f"{a} {v:.2f}%" for a, v in mentor_acc.items())
             + f"; total {time.perf_counter() - t0:.0f} s", "",
             "| method | mentor logits | last top-1 | best top-1 |", "|---|---|---|---|"]
    for (label, spec), vals in results.items():
        lines.append(f"| {label} | {'-' if label == 'nokd' else spec} | "
                     f"{_mean_std([r[0] for r in vals])} | {_mean_std([r[1] for r in vals])} |")
    print("\n" + "\n".join(lines), flush=True)
    return 0


TEST: list[torch.Tensor] = []  # (x_test, y_test), set by main

if __name__ == "__main__":
    raise SystemExit(main())

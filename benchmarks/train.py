"""Student training throughput: nokd, ClassroomKD from the logit cache, and ClassroomKD with
the mentors run live (online), for the paper's resnet20 classroom (teacher resnet110 +
peers resnet8, resnet14, ShuffleV2, MobileNetV2, ShuffleV1) at CIFAR-100 shapes (100
classes, batch 64). Mentors are randomly initialised checkpoints (throughput only) and the
data is synthetic 32x32 images; the cache is keyed (1 view a sample) so that building it
is cheap, which does not change the per-step cost of reading it.

Each case runs `ckd.train.train` for 1 + R short epochs (R = --repeats) and reports the
fastest and the median of the last R epochs' step times (the first epoch warms up; the
minimum is robust to other processes on a shared machine). The projected 240-epoch
CIFAR-100 time is 240 * 782 steps (50,000 / 64) * the median step time (training steps
only, no evaluation).

    .venv/bin/python benchmarks/train.py                 # CPU (reference loss)
    .venv/bin/python benchmarks/train.py --device cuda   # GPU: bf16, channels_last, Triton
    .venv/bin/python benchmarks/train.py --device cuda --cuda-graphs   # + each case replayed
    .venv/bin/python benchmarks/train.py --deterministic   # + each case with --deterministic
    .venv/bin/python benchmarks/train.py --multi r8,r14,wrn_16_1   # N students, one pass
    .venv/bin/python benchmarks/train.py --cases online --precision bf16   # mentors' autocast
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

CLASSROOM = ["resnet110", "resnet8", "resnet14", "ShuffleV2", "MobileNetV2", "ShuffleV1"]
CIFAR_STEPS = -(-50_000 // 64)  # 782 steps an epoch at batch 64


def make_mentors(root: Path, num_classes: int, archs: list[str] = CLASSROOM) -> dict[str, str]:
    from ckd.models import create_model, save_checkpoint

    paths = {}
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        model = create_model(arch, num_classes)
        # calibrate BatchNorm on one random batch: a fresh net in eval mode (running stats
        # 0/1) can overflow fp16 logits, which the cache would store as inf
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        with torch.no_grad():
            model.train()(torch.randn(128, 3, 32, 32))
        paths[arch] = str(save_checkpoint(root / f"{arch}.pt", model, arch=arch,
                                          num_classes=num_classes, dataset="synthetic",
                                          metrics={}))
    return paths


def run_case(name: str, cfg: dict) -> dict:
    from ckd.train import train

    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    times = sorted(e["time_s"] / res["steps_per_epoch"] for e in res["history"][1:])
    step_s, best = times[len(times) // 2], times[0]
    return {"case": name, "steps": res["steps_per_epoch"], "step_ms": 1000 * step_s,
            "min_step_ms": 1000 * best, "steps_per_s": 1.0 / step_s,
            "img_per_s": cfg["batch_size"] / step_s,
            "projected_240ep_h": 240 * CIFAR_STEPS * step_s / 3600, "wall_s": wall}


def fastpaths(device: str, batch: int, num_classes: int, reps: int, compile_: bool,
              deterministic: bool = False) -> None:
    """Student resnet20 SGD step (forward, CE, backward, step) under each fast path, min of
    `reps` timed steps after 2 warm-up steps. With `deterministic`, a twin of each variant
    (same initial weights) steps under `ckd.determinism.deterministic()` right after it,
    step for step, so both see the same load; the twins' final weights are compared."""
    import contextlib

    import torch.nn.functional as F

    from ckd.determinism import deterministic as det_mode
    from ckd.models import create_model

    dev = torch.device(device)
    x0 = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    variants = [("fp32, contiguous", False, False, False), ("fp32, channels_last", True,
                                                            False, False)]
    if dev.type == "cuda":
        variants += [("bf16 autocast, channels_last", True, True, False)]
    if compile_:
        variants += [(f"{variants[-1][0]}, torch.compile", *variants[-1][1:3], True)]
    modes = [False, True] if deterministic else [False]
    print("\n| student step variant | min step (ms) |\n|---|---|")
    for name, cl, amp, comp in variants:
        x = x0.contiguous(memory_format=torch.channels_last) if cl else x0
        models, opts, fwds = [], [], []
        for _ in modes:
            torch.manual_seed(0)
            model = create_model("resnet20", num_classes).to(dev)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            models.append(model)
            opts.append(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
            fwds.append(torch.compile(model) if comp else model)
        ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else \
            contextlib.nullcontext
        best = [float("inf")] * len(modes)
        for i in range(reps + 2):
            for k, det in enumerate(modes):
                with det_mode(det):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    with ctx():
                        loss = F.cross_entropy(fwds[k](x).float(), y)
                    opts[k].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[k].step()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                if i >= 2:
                    best[k] = min(best[k], time.perf_counter() - t)
        print(f"| {name} | {1000 * best[0]:.1f} |")
        if deterministic:
            same = all(torch.equal(a, b) for a, b in zip(
                models[0].state_dict().values(), models[1].state_dict().values(), strict=True))
            print(f"| {name}, --deterministic | {1000 * best[1]:.1f} "
                  f"({best[1] / best[0]:.2f}x; weights after {reps + 2} steps "
                  f"{'equal' if same else 'differ'}) |")


def _median_epoch_s(res: dict) -> float:
    times = sorted(e["time_s"] for e in res["history"][1:])
    return times[len(times) // 2]


def multi(students: list[str], base: dict, cache: str, root: Path) -> None:
    """N students from one pass (one stream, one cache gather a step) vs N separate runs:
    kd from the cached resnet110 logits; set-steps/s = steps an epoch / the time every
    student needs for one epoch (one pass: the pass; separate: the sum of the runs)."""
    from ckd.train import train

    cfg = dict(base, method="kd", cache=cache, mentors=["resnet110"])
    t0 = time.perf_counter()
    joint = train(dict(cfg, student=",".join(students), out=str(root / "joint")))
    joint_wall = time.perf_counter() - t0
    steps = joint["students"][0]["steps_per_epoch"]
    joint_s = _median_epoch_s(joint["students"][0])
    sep_s, sep_wall = 0.0, 0.0
    for name in students:
        t0 = time.perf_counter()
        sep_s += _median_epoch_s(train(dict(cfg, student=name, out=str(root / f"sep-{name}"))))
        sep_wall += time.perf_counter() - t0
    print(f"\nstudents {','.join(students)}; kd from cached resnet110 logits; "
          f"{steps} steps an epoch, batch {base['batch_size']}, {base['device']}, "
          f"{torch.get_num_threads()} threads")
    print("| mode | epoch s (median) | set steps/s | wall s (incl. set-up, warm-up epoch) |")
    print("|---|---|---|---|")
    print(f"| {len(students)} students, one pass | {joint_s:.2f} | {steps / joint_s:.2f} | "
          f"{joint_wall:.1f} |")
    print(f"| {len(students)} separate runs | {sep_s:.2f} | {steps / sep_s:.2f} | "
          f"{sep_wall:.1f} |")
    print(f"one pass / separate: {sep_s / joint_s:.2f}x steps/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4, help="steps an epoch")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs a case")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--cases", default="nokd,cache,online",
                    help="of nokd,cache,online (classroom) and crd-cache,crd-online,"
                         "sdkd-cache,sdkd-online (feature methods, teacher resnet110)")
    ap.add_argument("--nce-k", type=int, default=16384, help="crd negatives (RepDistiller's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also run each logit-method case with `ckd train --cuda-graphs` "
                    "(CUDA only; feature-method cases run eagerly only)")
    ap.add_argument("--deterministic", action="store_true",
                    help="also run each case (and its --cuda-graphs twin) with `ckd train "
                    "--deterministic`, right after it (--fastpaths: each step variant, "
                    "step for step)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                    help="the mentors' forward precision: the cache is built at it and the "
                    "online mentors run at it (--mentor-precision); default: the trainer's "
                    "(fp32 cache; online bf16 with --amp on CUDA, else fp32)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--multi", help="comma list of students: one pass vs separate runs")
    ap.add_argument("--fastpaths", action="store_true",
                    help="only time the student step under each fast path")
    ap.add_argument("--fastpath-steps", type=int, default=8,
                    help="--fastpaths: timed steps a variant (the minimum is reported)")
    args = ap.parse_args()
    if args.cuda_graphs and not args.device.startswith("cuda"):
        ap.error("--cuda-graphs needs --device cuda (CUDA graphs); drop --cuda-graphs")
    if args.cuda_graphs and args.compile:
        ap.error("--cuda-graphs and --compile both capture the step: drop one")
    if args.fastpaths:
        fastpaths(args.device, args.batch_size, args.num_classes, args.fastpath_steps,
                  args.compile, args.deterministic)
        return

    from ckd.cache import build_cache
    from ckd.data import load_dataset

    n = args.steps * args.batch_size
    opts = dict(n_train=n, n_test=256, num_classes=args.num_classes, seed=0)
    root = Path(tempfile.mkdtemp(prefix="ckd-bench-train-"))
    base = dict(dataset="synthetic", dataset_options=opts, student="resnet20",
                epochs=1 + args.repeats, schedule="constant", batch_size=args.batch_size,
                device=args.device, progress=False, log_every=10**9, compile=args.compile,
                eval_every=10**9)
    cases = args.cases.split(",")
    rows = []
    # a throwaway run first: the process's first training run pays one-off costs (oneDNN
    # primitive creation, allocator growth) that would otherwise land on whichever case is first
    run_case("warm-up", dict(base, method="nokd", epochs=2, out=str(root / "warmup")))
    if args.multi:
        mentors = make_mentors(root / "mentors", args.num_classes)
        cache = build_cache(load_dataset("synthetic", **opts), {"resnet110": mentors[
            "resnet110"]}, root / "cache1", views=1, device=args.device, progress=False)
        multi(args.multi.split(","), base, str(cache), root)
        return
    def add(row: dict) -> None:  # each row as it comes (a time limit keeps those done)
        rows.append(row)
        print(f"[{row['case']}: {row['step_ms']:.1f} ms/step median]", flush=True)

    def run_det(name: str, cfg: dict) -> None:
        """The case and, with --deterministic, its deterministic twin right after it (an op
        without a deterministic kernel is reported, and the other cases still run)."""
        from ckd.determinism import DeterminismError

        add(run_case(name, cfg))
        if args.deterministic:
            try:
                add(run_case(f"{name}, --deterministic",
                             dict(cfg, deterministic=True, out=cfg["out"] + "-det")))
            except DeterminismError as err:
                print(f"[{name}, --deterministic: refused: {err}]", flush=True)

    def run_modes(name: str, cfg: dict) -> None:
        """The case eagerly and, with --cuda-graphs, replayed (logit methods only)."""
        run_det(name, cfg)
        if args.cuda_graphs and "+" not in cfg["method"]:
            run_det(f"{name}, --cuda-graphs",
                    dict(cfg, cuda_graphs=True, out=cfg["out"] + "-graphs"))

    if "nokd" in cases:
        run_modes("nokd", dict(base, method="nokd", out=str(root / "nokd")))
    feature_cases = [c for c in cases if c.startswith(("crd-", "sdkd-"))]
    if "cache" in cases or "online" in cases or feature_cases:
        t = time.perf_counter()
        classroom = "cache" in cases or "online" in cases
        mentors = make_mentors(root / "mentors", args.num_classes,
                               CLASSROOM if classroom else CLASSROOM[:1])
        ds = load_dataset("synthetic", **opts)
        cache = build_cache(ds, mentors, root / "cache", views=1, device=args.device,
                            progress=False, features=("pool",) if feature_cases else (),
                            precision=args.precision or "fp32")
        print(f"[built {len(mentors)}-mentor cache for {n} samples in "
              f"{time.perf_counter() - t:.0f} s]")
        for case in feature_cases:  # a feature method on the CE + KD of the teacher
            method, where = case.split("-")
            expr = {"crd": "kd+0.8*crd", "sdkd": "kd+sdkd"}[method]
            params = {"crd.nce_k": args.nce_k} if method == "crd" else {}
            run_modes(f"{expr}, {'cached' if where == 'cache' else 'online'} teacher "
                      "(resnet110)",
                      dict(base, method=expr, method_params=params, cache=str(cache),
                           mentors=CLASSROOM[:1], mentors_online=where == "online",
                           out=str(root / case)))
        if "cache" in cases:
            run_modes("classroom, cached logits",
                      dict(base, method="classroom", cache=str(cache), mentors=CLASSROOM,
                           out=str(root / "cached")))
        if "online" in cases:
            prec = f" ({args.precision})" if args.precision else ""
            run_modes(f"classroom, online mentors{prec}",
                      dict(base, method="classroom", cache=str(cache), mentors_online=True,
                           mentors=CLASSROOM, out=str(root / "online"),
                           mentor_precision=args.precision))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\ndevice: {dev}; torch {torch.__version__}; batch {args.batch_size}, "
          f"{args.num_classes} classes, student resnet20, steps timed: {args.steps}")
    print("| case | step ms (median) | step ms (min) | steps/s | img/s | "
          "projected 240 epochs CIFAR-100 (h) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['step_ms']:.1f} | {r['min_step_ms']:.1f} | "
              f"{r['steps_per_s']:.2f} | {r['img_per_s']:.0f} | "
              f"{r['projected_240ep_h']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

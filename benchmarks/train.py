"""Student training throughput: nokd, ClassroomKD from the logit cache, and ClassroomKD with
the mentors run live (online), for the paper's resnet20 classroom (teacher resnet110 +
peers resnet8, resnet14, ShuffleV2, MobileNetV2, ShuffleV1) at CIFAR-100 shapes (100
classes, batch 64). Mentors are randomly initialised checkpoints (throughput only) and the
data is synthetic 32x32 images; the cache is keyed (1 view a sample) so that building it
is cheap, which does not change the per-step cost of reading it.

Each case runs `ckd.train.train` for two short epochs and times the second; the projected
240-epoch CIFAR-100 time is 240 * 782 steps (50,000 / 64) * the measured step time
(training steps only, no evaluation).

    .venv/bin/python benchmarks/train.py                 # CPU (reference loss)
    .venv/bin/python benchmarks/train.py --device cuda   # GPU: bf16, channels_last, Triton
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


def make_mentors(root: Path, num_classes: int) -> dict[str, str]:
    from ckd.models import create_model, save_checkpoint

    paths = {}
    for i, arch in enumerate(CLASSROOM):
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
    ep = res["history"][-1]  # second epoch: warmed up
    step_s = ep["time_s"] / res["steps_per_epoch"]
    return {"case": name, "steps": res["steps_per_epoch"], "step_ms": 1000 * step_s,
            "steps_per_s": 1.0 / step_s, "img_per_s": cfg["batch_size"] / step_s,
            "projected_240ep_h": 240 * CIFAR_STEPS * step_s / 3600, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=6, help="steps an epoch (2 epochs a case)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--cases", default="nokd,cache,online")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from ckd.cache import build_cache
    from ckd.data import load_dataset

    n = args.steps * args.batch_size
    opts = dict(n_train=n, n_test=256, num_classes=args.num_classes, seed=0)
    root = Path(tempfile.mkdtemp(prefix="ckd-bench-train-"))
    base = dict(dataset="synthetic", dataset_options=opts, student="resnet20", epochs=2,
                batch_size=args.batch_size, device=args.device, progress=False,
                log_every=10**9, compile=args.compile, eval_every=10**9)
    cases = args.cases.split(",")
    rows = []
    if "nokd" in cases:
        rows.append(run_case("nokd", dict(base, method="nokd", out=str(root / "nokd"))))
    if "cache" in cases or "online" in cases:
        t = time.perf_counter()
        mentors = make_mentors(root / "mentors", args.num_classes)
        ds = load_dataset("synthetic", **opts)
        cache = build_cache(ds, mentors, root / "cache", views=1, device=args.device,
                            progress=False)
        print(f"[built 6-mentor cache for {n} samples in {time.perf_counter() - t:.0f} s]")
        if "cache" in cases:
            rows.append(run_case("classroom, cached logits",
                                 dict(base, method="classroom", cache=str(cache),
                                      mentors=CLASSROOM, out=str(root / "cached"))))
        if "online" in cases:
            rows.append(run_case("classroom, online mentors",
                                 dict(base, method="classroom", cache=str(cache),
                                      mentors_online=True, mentors=CLASSROOM,
                                      out=str(root / "online"))))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\ndevice: {dev}; torch {torch.__version__}; batch {args.batch_size}, "
          f"{args.num_classes} classes, student resnet20, steps timed: {args.steps}")
    print("| case | step (ms) | steps/s | img/s | projected 240 epochs CIFAR-100 (h) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} | "
              f"{r['img_per_s']:.0f} | {r['projected_240ep_h']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

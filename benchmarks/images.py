"""Image-folder benchmark: `ckd prepare imagefolder` images/s (decode + shrink + JPEG
encode), random-resized-crop boxes/s, the replaying FFCV decoder's images/s (decode +
crop + resize), decode + crop + mentor forward images/s at 224 px, and `cache-logits`
end to end on the JPEG folder (decode + crop + mentor + write).

    .venv/bin/python benchmarks/images.py [--images 256] [--out FILE.md]

The folder is written by the script from scikit-learn's two sample photos (427 x 640),
cropped and rescaled to ImageNet-like sizes (long side 300..640). Every number printed is
measured on the machine that runs it (CPU here).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LINES: list[str] = []


def say(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def write_folder(root: Path, n: int, classes: int = 4) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        ph = photos[i % 2]
        h, w = rng.integers(200, 427), rng.integers(250, 640)
        y, x = rng.integers(0, 427 - h + 1), rng.integers(0, 640 - w + 1)
        im = Image.fromarray(ph[y:y + h, x:x + w])
        s = rng.uniform(0.8, 1.4)
        im = im.resize((max(16, int(w * s)), max(16, int(h * s))), Image.BILINEAR)
        split = "val" if i % 8 == 0 else "train"
        d = root / split / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:05d}.jpg", quality=92)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from ckd.cache import build_cache
    from ckd.data.image_views import ImageViews
    from ckd.data.imagefolder import prepare_imagefolder
    from ckd.data.images import ImageLoader
    from ckd.data.rrc import rrc_views
    from ckd.data.views import normalize
    from ckd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    cores = os.cpu_count()
    say(f"machine: {platform.processor() or platform.machine()}, {cores} cores visible, "
        f"torch {torch.__version__} threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "folder", Path(tmp) / "prepared"
        write_folder(root, args.images)
        t = time.perf_counter()
        meta = prepare_imagefolder(root, out, max_side=512, quality=90, progress=False)
        dt = time.perf_counter() - t
        n_all = meta["n_train"] + meta["n_test"]
        say(f"prepare imagefolder (--max-side 512 --quality 90, {n_all} images, all cores): "
            f"{n_all / dt:.1f} img/s end to end (incl. ffcv start-up)")
        beton = out / "train.beton"
        loader = ImageLoader(beton, [224], batch_size=32)
        n = len(loader.beton)
        hw = torch.from_numpy(loader.beton.orig_hw)
        big = torch.arange(200_000)
        t = time.perf_counter()
        rrc_views(0, big, 0, torch.full_like(big, 375), torch.full_like(big, 500))
        say(f"rrc_views: {200_000 / (time.perf_counter() - t):,.0f} boxes/s (200k samples)")
        loader.set_boxes(torch.arange(n), rrc_views(0, torch.arange(n), 0, hw[:, 0], hw[:, 1]))
        for _ in loader.iterate(np.arange(min(n, 32))):  # compile the decoder once
            pass
        for reps in (1,):
            t = time.perf_counter()
            for _ in range(reps):
                for _ in loader.iterate(np.arange(n)):
                    pass
            say(f"replaying decoder (JPEG decode + crop + INTER_AREA resize to 224, "
                f"{n} images): {reps * n / (time.perf_counter() - t):.1f} img/s")
        for arch in ("resnet18", "mobilenet_v2", "resnet50"):
            model = create_model(arch, 1000).eval()
            done, t = 0, time.perf_counter()
            with torch.no_grad():
                for imgs, _, _ in loader.iterate(np.arange(min(n, 64))):
                    x = normalize(imgs[0], meta["mean"], meta["std"]).permute(0, 3, 1, 2)
                    model(x.contiguous())
                    done += len(x)
            say(f"decode + crop + {arch} forward at 224 px, batch 32: "
                f"{done / (time.perf_counter() - t):.1f} img/s")
        ckpt = Path(tmp) / "resnet18.pt"
        save_checkpoint(ckpt, create_model("resnet18", meta["num_classes"]), arch="resnet18",
                        num_classes=meta["num_classes"], dataset=meta["name"], metrics=None)
        t = time.perf_counter()
        build_cache(ImageViews(out, batch_size=32), {"r18": ckpt}, Path(tmp) / "cache",
                    views=1, batch_size=32, progress=False)
        dt = time.perf_counter() - t
        say(f"cache-logits --views 1, resnet18 at 224 px, {n} train + {meta['n_test']} test "
            f"images (decoder compiles, checkpoint hash and the test pass included): "
            f"{n / dt:.1f} train img/s end to end")
    if args.out:
        args.out.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()

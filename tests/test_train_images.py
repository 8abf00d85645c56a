"""`ckd train` on a prepared image folder from its random-resized-crop cache: the student
is fed exactly the cached view's box at its own resolution, trains end to end, and a
2-rank torchrun build of the cache equals a 1-process build byte for byte."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from ckd.cache import build_cache, open_cache
from ckd.data.image_views import ImageViews
from ckd.models import create_model, save_checkpoint

# Slow: FFCV's replay decoder compiles per resolution, and the torchrun build.
pytestmark = pytest.mark.slow
SEED, STUDENT_PX = 5, 40  # the mentor runs at resnet8's 32 px, the student at 40 px


@pytest.fixture(scope="module")
def image_cache(prepared_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-images")
    torch.manual_seed(0)
    ckpt = root / "r8.pt"
    save_checkpoint(ckpt, create_model("resnet8", 3), arch="resnet8", num_classes=3,
                    dataset="imagefolder", metrics=None)
    out = build_cache(ImageViews(prepared_images, batch_size=8), {"r8": ckpt}, root / "cache",
                      views=2, seed=SEED, dtype="fp32", samples_per_chunk=8, batch_size=8,
                      progress=False)
    return dict(prepared=prepared_images, ckpt=ckpt, out=out, root=root)


def test_student_batches_replay_the_cached_boxes(image_cache):
    from ckd.data.images import ImageLoader
    from ckd.train import load_config
    from ckd.train.setup import load_data, make_loaders

    cfg = load_config(prepared=str(image_cache["prepared"]), cache=str(image_cache["out"]),
                      student="resnet8", resolution=STUDENT_PX, batch_size=8, seed=3)
    ds = load_data(cfg)
    train, test = make_loaders(cfg, ds, torch.device("cpu"), 0, 1)
    cache = open_cache(str(image_cache["out"]))
    stored = zarr.open_group(str(image_cache["out"]), mode="r")["mentors/r8/boxes"][:]
    ref = ImageLoader(image_cache["prepared"] / "train.beton", [STUDENT_PX], batch_size=8)
    epoch, seen = 1, 0
    train.set_epoch(epoch)
    for imgs, _, idx in train:
        assert imgs.shape[1:] == (STUDENT_PX, STUDENT_PX, 3) and imgs.dtype == torch.uint8
        slots, _ = cache.epoch_views(epoch, idx, 3)  # the rows the mentors' logits come from
        boxes = torch.from_numpy(stored[slots.numpy(), idx.numpy()].astype(np.int64))
        ref.set_boxes(idx, boxes)
        (want,), _, got_idx = next(iter(ref.iterate(idx.numpy())))
        assert torch.equal(got_idx, idx)
        assert torch.equal(imgs, want)  # the cached view's box, at the student's resolution
        seen += len(idx)
    assert seen == len(ds.train)
    assert sum(len(i) for _, _, i in test) == len(ds.test)


def test_train_on_an_image_folder(image_cache, tmp_path):
    from ckd.train import train

    res = train(dict(prepared=str(image_cache["prepared"]), cache=str(image_cache["out"]),
                     student="resnet8", resolution=STUDENT_PX, method="kd", epochs=2,
                     batch_size=8, device="cpu", backend="reference", progress=False,
                     out=str(tmp_path / "run")))
    n = len(ImageViews(image_cache["prepared"]).train)
    assert res["steps"] == 2 * -(-n // 8)
    assert 0 <= res["best_acc"] <= 100
    with pytest.raises(ValueError, match="image folder.*--cache"):
        train(dict(prepared=str(image_cache["prepared"]), student="resnet8", method="nokd",
                   epochs=1, device="cpu", progress=False, out=str(tmp_path / "nocache")))


def test_two_rank_image_cache_equals_one_process(image_cache, tmp_path):
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ckd.cli.main", "cache-logits", "--prepared", str(image_cache["prepared"]),
           "--mentors", f"r8={image_cache['ckpt']}", "--views", "2", "--seed", str(SEED),
           "--dtype", "fp32", "--samples-per-chunk", "8", "--batch-size", "8", "--device",
           "cpu", "--quiet", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]

    def tree(p):
        return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*"))
                if f.is_file() and f.name != ".ckd-writer.lock"}

    assert tree(out) == tree(image_cache["out"])

"""Test-wide set-up. TRITON_INTERPRET must be set before anything imports triton, so
that the Triton kernels run (slowly, on numpy) on CPU-only machines.

`CKD_TEST_DEVICE=cuda` (scripts/gpu_check.sh) runs the kernel and view tests on the GPU
instead: compiled kernels, no interpreter; those tests read the device from
`tests/device.py`."""

import os

if os.environ.get("CKD_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # cuBLAS reads it once, at its first use: deterministic tests need it from the start
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("OMP_NUM_THREADS", "2")


# ------------------------------------------------------------------ a small image folder
import pytest  # noqa: E402


def write_image_folder(root, *, train_per_class: int = 6, val_per_class: int = 2):
    """`root/{train,val}/class{0,1,2}/img*.{jpg,png}`: scikit-learn's two sample photos
    at several sizes and aspect ratios (classes 0, 1) and upscaled digits (class 2), plus
    one corrupt JPEG in train/class0. Returns root."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB photos
    digits = load_digits().images
    scales = (1.0, 0.5, 0.3, 0.17, 0.8, 0.25)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                if c < 2:
                    s = scales[j % len(scales)]
                    size = (max(8, int(640 * s)), max(8, int(427 * s * (1 + 0.3 * (j % 3)))))
                    im = Image.fromarray(photos[(c + j) % 2]).resize(size, Image.BILINEAR)
                else:
                    grey = (digits[10 * c + j + (50 if split == "val" else 0)] * 15)
                    im = Image.fromarray(grey.astype(np.uint8)).resize(
                        (8 * (j + 2), 8 * (j + 3)), Image.NEAREST)
                im.save(folder / f"img{j}.{'png' if j % 2 else 'jpg'}")
    (root / "train" / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def prepared_images(image_folder, tmp_path_factory):
    """`ckd prepare imagefolder` output of `image_folder` at --max-side 128."""
    from ckd.data.imagefolder import prepare_imagefolder

    out = tmp_path_factory.mktemp("prepared") / "images"
    prepare_imagefolder(image_folder, out, max_side=128, workers=2, part_size=4,
                        progress=False)
    return out


# ------------------------------------------------------------------ an S3 server
@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port (tests/s3_server.py)."""
    pytest.importorskip("obstore")
    from s3_server import moto_s3

    with moto_s3() as aws:
        yield aws


@pytest.fixture()
def s3(s3_server, monkeypatch):
    """A fresh bucket; the AWS_* variables set for this process and its children."""
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CKD_S3_MAX_RETRIES", "1")
    import uuid

    from s3_server import create_bucket

    bucket = f"ckd-{uuid.uuid4().hex[:10]}"
    create_bucket(s3_server, bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def s3_mentors(tmp_path_factory):
    """Two resnet8 checkpoints (5 classes) for the object-store tests."""
    from test_cache_robust import mentor

    tmp = tmp_path_factory.mktemp("s3mentors")
    return {"r8": mentor(tmp / "r8.pt", 0), "r8b": mentor(tmp / "r8b.pt", 1)}

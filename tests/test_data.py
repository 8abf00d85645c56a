"""Datasets (CIFAR pickle parsing, digits, synthetic), fingerprints, `ckd prepare`."""

import io
import json
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckd.data.datasets import (
    CIFAR10_MEAN,
    CIFAR100_MEAN,
    CIFAR100_STD,
    Dataset,
    Split,
    load_dataset,
)


def _cifar_entry(n: int, label_key: bytes, rng: np.random.Generator, ncls: int) -> dict:
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, ncls, n).tolist(), b"batch_label": b"x"}


def _write_cifar(root, name: str, as_tar: bool, rng: np.random.Generator) -> dict:
    """A tiny archive in the official format; returns {file: entry}."""
    if name == "cifar100":
        folder, key, ncls = "cifar-100-python", b"fine_labels", 100
        files = {"train": 7, "test": 3}
    else:
        folder, key, ncls = "cifar-10-batches-py", b"labels", 10
        files = {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}
    entries = {f: _cifar_entry(n, key, rng, ncls) for f, n in files.items()}
    if as_tar:
        tar_name = "cifar-100-python.tar.gz" if name == "cifar100" else "cifar-10-python.tar.gz"
        with tarfile.open(root / tar_name, "w:gz") as tar:
            for f, e in entries.items():
                blob = pickle.dumps(e)
                info = tarfile.TarInfo(f"{folder}/{f}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (root / folder).mkdir()
        for f, e in entries.items():
            (root / folder / f).write_bytes(pickle.dumps(e))
    return entries


def _expected(entries: list[dict], key: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([e[b"data"] for e in entries])
    n = data.shape[0]
    imgs = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):  # explicit official layout: R plane, G plane, B plane, row-major
        for c in range(3):
            imgs[i, :, :, c] = data[i, c * 1024:(c + 1) * 1024].reshape(32, 32)
    return imgs, np.concatenate([np.asarray(e[key]) for e in entries])


@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_cifar_parsing(tmp_path, name, as_tar):
    entries = _write_cifar(tmp_path, name, as_tar, np.random.default_rng(0))
    ds = load_dataset(name, tmp_path, download=False)
    key = b"fine_labels" if name == "cifar100" else b"labels"
    train_files = ["train"] if name == "cifar100" else [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test"] if name == "cifar100" else ["test_batch"]
    for split, files in ((ds.train, train_files), (ds.test, test_files)):
        imgs, labels = _expected([entries[f] for f in files], key)
        assert split.images.dtype == np.uint8 and np.array_equal(split.images, imgs)
        assert split.labels.dtype == np.int64 and np.array_equal(split.labels, labels)
    assert ds.num_classes == (100 if name == "cifar100" else 10)
    assert ds.mean == (CIFAR100_MEAN if name == "cifar100" else CIFAR10_MEAN)
    if name == "cifar100":
        assert ds.std == CIFAR100_STD
    if not as_tar:  # the extracted folder itself may be given as data_dir
        folder = "cifar-100-python" if name == "cifar100" else "cifar-10-batches-py"
        assert load_dataset(name, tmp_path / folder, download=False).fingerprint == ds.fingerprint


def test_cifar_missing_names_both_ways_out(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar100", tmp_path, download=False)
    msg = str(err.value)
    assert "cifar-100-python.tar.gz" in msg and "--data-dir" in msg and "internet" in msg

    # download=True with no network: torchvision absent, urllib fails -> same guidance.
    import urllib.request

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(RuntimeError, match="download failed.*--data-dir.*internet"):
        load_dataset("cifar10", tmp_path / "d", download=True)
    assert not list((tmp_path / "d").glob("*"))  # no partial download left behind


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="cifar10, cifar100, digits, synthetic"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['n_train'\]; its options: "
                       "image_size"):
        load_dataset("digits", n_train=5)


def test_digits():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.train.images.shape == (1347, 32, 32, 3) and ds.test.images.shape == (450, 32, 32, 3)
    assert ds.train.images.dtype == np.uint8 and ds.train.images.max() == 255
    img = ds.train.images[0]
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
    # nearest-neighbour 4x upscale: every 4x4 block is constant
    blocks = img[..., 0].reshape(8, 4, 8, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()
    # stratified 25% split: each class's test share within one sample of 25%
    tr = np.bincount(ds.train.labels, minlength=10)
    te = np.bincount(ds.test.labels, minlength=10)
    assert (np.abs(te - 0.25 * (tr + te)) <= 1).all()
    assert load_dataset("digits").fingerprint == ds.fingerprint  # fixed split
    assert len(ds.mean) == 3 and 0 < ds.mean[0] < 1 and 0 < ds.std[0] < 1


def test_digits_image_size():
    big, small = load_dataset("digits"), load_dataset("digits", image_size=16)
    assert small.train.images.shape == (1347, 16, 16, 3)
    # the same 8x8 pixels, in 2x2 instead of 4x4 blocks
    np.testing.assert_array_equal(small.train.images[:, ::2, ::2], big.train.images[:, ::4, ::4])
    assert small.fingerprint != big.fingerprint and small.extra == {"image_size": 16}
    with pytest.raises(ValueError, match="image_size=20 is invalid: must be one of 8, 16, 32"):
        load_dataset("digits", image_size=20)
    with pytest.raises(ValueError, match="takes no option"):
        load_dataset("cifar100", image_size=16)


def test_synthetic_deterministic_and_learnable():
    a = load_dataset("synthetic", n_train=400, n_test=100, num_classes=4, seed=1)
    b = load_dataset("synthetic", n_train=400, n_test=100, num_classes=4, seed=1)
    c = load_dataset("synthetic", n_train=400, n_test=100, num_classes=4, seed=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert np.array_equal(a.train.images, b.train.images)
    assert a.train.images.shape == (400, 32, 32, 3) and a.num_classes == 4
    assert (np.bincount(a.train.labels) == 100).all()
    # class structure: nearest class mean (fit on train) classifies the test set
    x_tr = a.train.images.reshape(400, -1).astype(np.float64)
    means = np.stack([x_tr[a.train.labels == k].mean(0) for k in range(4)])
    x_te = a.test.images.reshape(100, -1).astype(np.float64)
    pred = ((x_te[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == a.test.labels).mean() > 0.9


def test_fingerprint_sees_one_pixel_and_one_label():
    ds = load_dataset("synthetic", n_train=20, n_test=5)
    base = ds.fingerprint
    assert len(base) == 16 and int(base, 16) >= 0
    imgs = ds.train.images.copy()
    imgs[3, 5, 7, 1] ^= 1
    mod = Dataset(ds.name, Split(imgs, ds.train.labels), ds.test, ds.num_classes, ds.mean, ds.std)
    labels = ds.test.labels.copy()
    labels[0] = (labels[0] + 1) % ds.num_classes
    mod2 = Dataset(ds.name, ds.train, Split(ds.test.images, labels), ds.num_classes, ds.mean,
                   ds.std)
    assert len({base, mod.fingerprint, mod2.fingerprint}) == 3


def test_split_validation():
    with pytest.raises(ValueError, match="uint8"):
        Split(np.zeros((2, 32, 32, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        Split(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3))


def test_prepare_roundtrip(tmp_path):
    from ckd.cli.data import prepare
    from ckd.data.beton import load_prepared

    out = tmp_path / "syn"
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # neither ffcv's import value (1) nor its worker count (<= 2)
    try:
        res = CliRunner().invoke(prepare, ["synthetic", "--out", str(out), "--n-train",
                                           "150", "--n-test", "40", "--num-classes", "5",
                                           "--seed", "3"])
        assert torch.get_num_threads() == 3  # writing betons leaves torch's threads alone
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    ds = load_dataset("synthetic", n_train=150, n_test=40, num_classes=5, seed=3)
    assert f"fingerprint {ds.fingerprint}" in res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fingerprint"] == ds.fingerprint and meta["n_train"] == 150
    assert meta["n_test"] == 40 and meta["num_classes"] == 5 and meta["name"] == "synthetic"
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # neither ffcv's import value (1) nor its worker count (<= 2)
    try:
        back = load_prepared(out)
        assert torch.get_num_threads() == 3  # ffcv's side effect on torch's threads undone
    finally:
        torch.set_num_threads(threads)
    assert back.fingerprint == ds.fingerprint and back.num_classes == 5
    assert np.array_equal(back.train.images, ds.train.images)
    assert np.array_equal(back.test.labels, ds.test.labels)
    assert back.mean == pytest.approx(ds.mean) and back.std == pytest.approx(ds.std)

    meta["fingerprint"] = "0" * 16  # a mixed-up directory is refused
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint.*re-run `ckd prepare`"):
        load_prepared(out)
    with pytest.raises(FileNotFoundError, match="ckd prepare"):
        load_prepared(tmp_path / "nothing")


def test_prepare_cli_bad_dataset(tmp_path):
    from ckd.cli.main import main

    res = CliRunner().invoke(main, ["prepare", "mnist", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    assert "must be one of cifar10, cifar100, digits, synthetic" in res.output

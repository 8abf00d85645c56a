"""`ckd prepare imagefolder|imagenet`: JPEG betons, original sizes, skipped files,
fingerprint, resume and errors (on a small folder written by the tests, see conftest)."""

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ckd.data import imagefolder
from ckd.data.imagefolder import prepare_imagefolder, scan_folder
from ckd.data.images import ImageBeton, beton_fingerprint


def test_prepare_writes_jpeg_betons(image_folder, prepared_images):
    meta = json.loads((prepared_images / "meta.json").read_text())
    assert meta["classes"] == ["class0", "class1", "class2"]
    assert (meta["n_train"], meta["n_test"], meta["num_skipped"]) == (18, 6, 1)
    assert "train/class0/broken.jpg" in (prepared_images / "skipped.txt").read_text()
    for split, n in (("train", 18), ("test", 6)):
        beton = ImageBeton(prepared_images / f"{split}.beton")
        rows = (prepared_images / f"{split}_files.txt").read_text().splitlines()
        assert len(beton) == len(rows) == n
        assert np.array_equal(beton.labels, sorted(beton.labels))  # class-major order
        assert beton.reader.metadata["f0"]["mode"].tolist() == [0] * n  # all JPEG
        for i, row in enumerate(rows):
            rel, label = row.split("\t")
            assert "broken" not in rel and int(label) == beton.labels[i]
            src = Image.open(image_folder / rel).convert("RGB")
            assert tuple(beton.orig_hw[i]) == (src.height, src.width)
            sh, sw = beton.stored_hw[i]
            assert max(sh, sw) == min(128, max(src.height, src.width))
            stored = np.asarray(Image.open(io.BytesIO(beton.jpeg_bytes(i))).convert("RGB"))
            assert stored.shape == (sh, sw, 3)
            ref = np.asarray(src.resize((int(sw), int(sh)), Image.BOX), dtype=np.int16)
            assert np.abs(stored - ref).mean() < 6  # same picture (JPEG + resampling noise)
    assert beton_fingerprint(prepared_images) == meta["fingerprint"]
    assert all(0 < m < 1 for m in meta["mean"]) and all(0 < s < 0.5 for s in meta["std"])


def test_resume_keeps_finished_parts(image_folder, prepared_images, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    saved = []
    real_save = imagefolder._save_part

    def save_then_die(path, arrays):
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if killed after two parts
        real_save(path, arrays)
        saved.append(path.name)

    monkeypatch.setattr(imagefolder, "_save_part", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_imagefolder(image_folder, out, max_side=128, workers=1, part_size=4,
                            progress=False)
    assert sorted(p.name for p in (out / ".parts").glob("*.npz")) == sorted(saved)
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_imagefolder(image_folder, out, max_side=128, part_size=4, progress=False)
    with pytest.raises(ValueError, match="quality"):
        prepare_imagefolder(image_folder, out, max_side=128, quality=70, part_size=4,
                            resume=True, progress=False)
    redone = []
    monkeypatch.setattr(imagefolder, "_save_part",
                        lambda p, a: (redone.append(p.name), real_save(p, a)))
    meta = prepare_imagefolder(image_folder, out, max_side=128, workers=1, part_size=4,
                               resume=True, progress=False)
    assert not set(redone) & set(saved) and len(redone) == 7 - 2  # 5 + 2 parts of 4 files
    assert meta["fingerprint"] == json.loads((prepared_images / "meta.json").read_text())[
        "fingerprint"]
    assert not (out / ".parts").exists()
    with pytest.raises(FileExistsError, match="already a prepared dataset"):
        prepare_imagefolder(image_folder, out, max_side=128, progress=False)


def test_bad_folders_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/"):
        scan_folder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "b").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\['b'\] are not in train/"):
        scan_folder(tmp_path)
    with pytest.raises(ValueError, match="1000 class folders"):
        scan_folder(tmp_path, imagenet=True)
    res = CliRunner().invoke(_cli(), ["prepare", "imagefolder", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--data-dir" in res.output


def test_imagenet_order_is_sorted_wnids(tmp_path):
    rng = np.random.default_rng(0)
    wnids = sorted({f"n{v:08d}" for v in rng.integers(1, 10**8, 1000)})
    assert len(wnids) == 1000
    for split in ("train", "val"):
        for w in wnids[::-1]:  # created in reverse: order must come from sorting
            (tmp_path / split / w).mkdir(parents=True)
            (tmp_path / split / w / f"{w}_1.JPEG").write_bytes(b"")
    scan = scan_folder(tmp_path, imagenet=True)
    assert scan.classes == wnids
    assert [lab for _, lab in scan.files["train"]] == list(range(1000))
    assert scan.files["test"][5][0] == f"val/{wnids[5]}/{wnids[5]}_1.JPEG"


def test_cli_prepare_imagefolder(image_folder, prepared_images, tmp_path):
    out = tmp_path / "cli"
    args = ["prepare", "imagefolder", "--data-dir", str(image_folder), "--out", str(out),
            "--max-side", "64", "--quality", "80", "--workers", "1"]
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    assert "18 train + 6 test images, 3 classes, 1 unreadable file(s) skipped" in res.output
    assert ImageBeton(out / "train.beton").stored_hw.max() == 64
    meta = json.loads((out / "meta.json").read_text())
    assert meta["extra"]["max_side"] == 64 and meta["extra"]["quality"] == 80
    # Other stored JPEGs, other fingerprint.
    assert meta["fingerprint"] != json.loads((prepared_images / "meta.json").read_text())[
        "fingerprint"]
    again = CliRunner().invoke(_cli(), args)
    assert again.exit_code != 0 and "already a prepared dataset" in again.output


def _cli():
    from ckd.cli.main import main

    return main

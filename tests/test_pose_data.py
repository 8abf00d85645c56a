"""Pose data: the synthetic COCO keypoint set and `ckd prepare coco-keypoints` (crops,
keypoints, fingerprint, bad input)."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ckd.cli.main import main
from ckd.pose.coco import crop_matrix, flip_pairs, load_pose_prepared, prepare_coco_keypoints
from ckd.pose.synthetic import JOINTS, make_synthetic_coco


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), seed=3, n_train_images=12,
                               n_val_images=4)


@pytest.fixture(scope="module")
def prepared(coco_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    prepare_coco_keypoints(coco_dir, out, input_size=(32, 24), progress=False)
    return out


def test_synthetic_is_coco_format_and_deterministic(coco_dir, tmp_path):
    from pycocotools.coco import COCO

    gt = COCO(str(coco_dir / "annotations" / "person_keypoints_train.json"))
    assert gt.loadCats(1)[0]["keypoints"] == list(JOINTS) and len(JOINTS) == 13
    anns = gt.loadAnns(gt.getAnnIds())
    assert len(anns) >= 12
    for a in anns:
        v = np.asarray(a["keypoints"]).reshape(13, 3)
        assert a["num_keypoints"] == int((v[:, 2] > 0).sum())
        assert (v[v[:, 2] == 0] == 0).all()  # unlabelled joints are 0 0 0, as in COCO
        assert set(v[:, 2].tolist()) <= {0, 1, 2}
    again = make_synthetic_coco(tmp_path / "again", seed=3, n_train_images=12,
                                n_val_images=4)
    for rel in ("annotations/person_keypoints_train.json", "train/000000000005.png"):
        assert (again / rel).read_bytes() == (coco_dir / rel).read_bytes()
    other = make_synthetic_coco(tmp_path / "other", seed=4, n_train_images=2, n_val_images=1)
    assert (other / "train/000000000001.png").read_bytes() != \
        (coco_dir / "train/000000000001.png").read_bytes()


def test_flip_pairs_from_names():
    assert flip_pairs(list(JOINTS)) == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]


def _bilinear(img: np.ndarray, x: float, y: float) -> np.ndarray:
    """Textbook bilinear sample at pixel-centre coordinates, zeros outside."""
    h, w, _ = img.shape
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    out = np.zeros(3)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[yy, xx]
    return out


def test_prepared_crops_match_the_source(coco_dir, prepared):
    from PIL import Image

    ds = load_pose_prepared(prepared)
    meta = ds.meta
    assert meta["store_size"] == [48, 36] and ds.num_joints == 13
    src = json.loads((coco_dir / "annotations/person_keypoints_train.json").read_text())
    kept = [a for a in src["annotations"] if a["num_keypoints"] > 0 and a["bbox"][2] > 1
            and a["bbox"][3] > 1]
    assert len(ds.train) == len(kept) == meta["n_train"]
    by_id = {a["id"]: a for a in kept}
    files = {im["id"]: im["file_name"] for im in src["images"]}
    rng = np.random.default_rng(0)
    for i in range(len(ds.train)):
        a = by_id[int(ds.train.ann_ids[i])]
        assert int(ds.train.image_ids[i]) == a["image_id"]
        assert np.allclose(ds.train.boxes[i], a["bbox"])
        cx, cy, s = (float(v) for v in ds.train.crops[i])
        kp = np.asarray(a["keypoints"], dtype=np.float64).reshape(13, 3)
        stored = ds.train.keypoints[i]
        lab = kp[:, 2] > 0
        assert np.array_equal(stored[:, 2], kp[:, 2])
        back = (stored[lab, :2] - np.array([35 / 2, 47 / 2])) / s + np.array([cx, cy])
        assert np.allclose(back, kp[lab, :2], atol=1e-3)  # crop field maps back exactly
        img = np.asarray(Image.open(coco_dir / "train" / files[a["image_id"]]).convert("RGB"),
                         dtype=np.float64)
        for _ in range(5):  # stored pixel == bilinear sample of the source at its preimage
            u, v = rng.integers(0, 36), rng.integers(0, 48)
            x, y = (u - 35 / 2) / s + cx, (v - 47 / 2) / s + cy
            assert np.abs(ds.train.images[i, v, u] - _bilinear(img, x, y)).max() <= 1.5
    m = crop_matrix(tuple(ds.train.crops[0]), (48, 36))
    assert np.allclose(m[:, :2], np.eye(2) * ds.train.crops[0][2])


def test_cli_prepare_and_bad_input(coco_dir, tmp_path):
    run = CliRunner().invoke(main, ["prepare", "coco-keypoints", "--data-dir", str(coco_dir),
                                    "--out", str(tmp_path / "p"), "--input-size", "32x24"])
    assert run.exit_code == 0, run.output
    assert "13 joints" in run.output
    # a JSON without keypoints (an instances file in the keypoint file's place)
    bad = tmp_path / "bad"
    shutil.copytree(coco_dir, bad)
    doc = json.loads((bad / "annotations/person_keypoints_val.json").read_text())
    for a in doc["annotations"]:
        a.pop("keypoints")
    for c in doc["categories"]:
        c.pop("keypoints")
    (bad / "annotations/person_keypoints_val.json").write_text(json.dumps(doc))
    run = CliRunner().invoke(main, ["prepare", "coco-keypoints", "--data-dir", str(bad),
                                    "--out", str(tmp_path / "q")])
    assert run.exit_code == 1
    assert "no keypoint annotations" in run.output and "person_keypoints" in run.output
    assert len(run.output.strip().splitlines()) == 1
    # an image missing
    gone = tmp_path / "gone"
    shutil.copytree(coco_dir, gone)
    (gone / "train/000000000002.png").unlink()
    run = CliRunner().invoke(main, ["prepare", "coco-keypoints", "--data-dir", str(gone),
                                    "--out", str(tmp_path / "r")])
    assert run.exit_code == 1 and "missing" in run.output and "000000000002.png" in run.output
    assert len(run.output.strip().splitlines()) == 1
    run = CliRunner().invoke(main, ["prepare", "coco-keypoints", "--data-dir", str(tmp_path),
                                    "--out", str(tmp_path / "s")])
    assert run.exit_code == 1 and "annotations/person_keypoints" in run.output

"""Pose training and the pose cache: cached == online mentors (fp32, all cached views),
cache verify --recompute, top-k heatmap caches, and the bad-input errors (joints, SimCC
bins, heatmap cache with a SimCC student)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckd.atomic import atomic_save, safe_torch_load
from ckd.cli.main import main
from ckd.pose.coco import prepare_coco_keypoints
from ckd.pose.synthetic import make_synthetic_coco
from ckd.pose.train import train_pose

SMALL = dict(epochs=1, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def pose_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose")
    make_synthetic_coco(root / "coco", seed=5, n_train_images=24, n_val_images=6)
    prepare_coco_keypoints(root / "coco", root / "prep", input_size=(32, 24), progress=False)
    data = str(root / "prep")
    ck = {}
    for name, student, seed, epochs in (("t", "resnet8-simcc", 1, 2), ("p", "resnet8-simcc", 2, 1),
                                        ("h", "resnet8-heatmap", 3, 1)):
        ck[name] = train_pose(dict(SMALL, data=data, student=student, seed=seed, epochs=epochs,
                                   out=str(root / name)))["checkpoint"]
    run = CliRunner().invoke(main, ["cache-logits", "--prepared", data, "--mentors",
                                    f"{ck['t']},{ck['p']}", "--out", str(root / "cache"),
                                    "--views", "2", "--dtype", "fp32", "--quiet"])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(main, ["cache-logits", "--prepared", data, "--mentors", ck["h"],
                                    "--out", str(root / "hcache"), "--views", "1",
                                    "--logits", "topk:16", "--quiet"])
    assert run.exit_code == 0, run.output
    return {"root": root, "data": data, "ck": ck}


@pytest.mark.parametrize("method", ["classroom", pytest.param("kd", marks=pytest.mark.slow)])
def test_cached_equals_online(pose_env, method):
    base = dict(data=pose_env["data"], student="resnet8-simcc", method=method, epochs=2,
                batch_size=16, progress=False, seed=7)
    ck = pose_env["ck"]
    cached = train_pose(dict(base, cache=str(pose_env["root"] / "cache")))
    online = train_pose(dict(base, mentors=[ck["t"], ck["p"]], slots=2, view_seed=0))
    a, b = cached["losses"], online["losses"]
    assert len(a) == len(b) == 2 * 3  # ~40 crops / 16 a batch, 2 epochs
    assert a == b  # bit for bit: the mentors run at one batch shape (MENTOR_BATCH)
    assert [h["mentor_active"] for h in cached["history"]] == \
        [h["mentor_active"] for h in online["history"]]
    for (k, p), q in zip(cached["model"].state_dict().items(),
                         online["model"].state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    assert cached["metrics"] == online["metrics"]
    assert a != train_pose(dict(base, method="nokd"))["losses"]  # the mentors do matter


def test_cache_contents_and_verify(pose_env):
    from ckd.pose.views import view_params

    cache = pose_env["root"] / "cache"
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["layout"] == {"kind": "simcc", "num_joints": 13, "dims": [48, 64]}
    params = np.load(cache / "params.npy")
    assert np.array_equal(params[1], view_params(0, torch.arange(meta["num_samples"]), 1))
    pck = np.load(cache / "pck.npy")
    assert pck.shape == (2, 2, meta["num_samples"]) and np.nanmax(pck) <= 1
    rows = np.load(cache / "rows_0.npy")
    assert rows.shape == (2, meta["num_samples"], 13, 112) and rows.dtype == np.float32
    run = CliRunner().invoke(main, ["cache", "verify", str(cache), "--recompute", "8",
                                    "--prepared", pose_env["data"]])
    assert run.exit_code == 0 and "OK" in run.output, run.output
    # a view table that no longer matches the keyed views (checksums made consistent)
    params[0, 3, 1] += 1.0
    np.save(cache / "params.npy", params)
    from ckd.pose.cache import _sha
    meta["files"]["params.npy"] = _sha(cache / "params.npy")
    (cache / "meta.json").write_text(json.dumps(meta))
    run = CliRunner().invoke(main, ["cache", "verify", str(cache)])
    assert run.exit_code == 0  # checksums alone pass
    run = CliRunner().invoke(main, ["cache", "verify", str(cache), "--recompute", "4"])
    assert run.exit_code == 1 and "1 views differ from the keyed view function" in run.output
    params[0, 3, 1] -= 1.0
    np.save(cache / "params.npy", params)
    meta["files"]["params.npy"] = _sha(cache / "params.npy")
    (cache / "meta.json").write_text(json.dumps(meta))
    pck_file = cache / "pck.npy"
    pck_file.write_bytes(pck_file.read_bytes()[:-4] + b"\0\0\0\0")
    run = CliRunner().invoke(main, ["cache", "verify", str(cache)])
    assert run.exit_code == 1 and "pck.npy: sha256 differs" in run.output


def test_topk_heatmap_cache_trains_heatmap_students(pose_env):
    h = pose_env["root"] / "hcache"
    meta = json.loads((h / "meta.json").read_text())
    assert meta["storage"] == "topk:16" and meta["layout"]["kind"] == "heatmap"
    assert np.load(h / "topk_0_logits.npy").shape[-1] == 16
    res = train_pose(dict(SMALL, data=pose_env["data"], student="resnet8-heatmap",
                          method="classroom", cache=str(h)))
    assert np.isfinite(res["losses"]).all()
    run = CliRunner().invoke(main, ["cache-logits", "--prepared", pose_env["data"],
                                    "--mentors", pose_env["ck"]["t"], "--out",
                                    str(pose_env["root"] / "x"), "--views", "1", "--logits",
                                    "topk:8"])
    assert run.exit_code == 1 and "top-k sparse storage is for heatmap rows" in run.output


def test_bad_input(pose_env, tmp_path):
    data, ck = pose_env["data"], pose_env["ck"]
    run = CliRunner().invoke(main, ["pose", "eval", ck["t"], "--data", data])
    assert run.exit_code == 0 and "pck" in run.output and "AP50" in run.output, run.output
    # a heatmap cache with a SimCC student
    with pytest.raises(ValueError, match="holds heatmap rows but student 'resnet8-simcc' has "
                                         "a simcc head"):
        train_pose(dict(SMALL, data=data, student="resnet8-simcc", method="aver",
                        cache=str(pose_env["root"] / "hcache")))
    # K different between the dataset and a mentor's head
    state = safe_torch_load(ck["p"])
    state["num_joints"] = 17
    atomic_save(state, tmp_path / "k17.pt")
    run = CliRunner().invoke(main, ["pose", "train", "--data", data, "--method", "kd",
                                    "--mentor", str(tmp_path / "k17.pt"), "--out",
                                    str(tmp_path / "r")])
    assert run.exit_code == 1
    assert "predicts 17 joints, the dataset" in run.output and "has 13" in run.output
    # SimCC bins that do not match the input size
    run = CliRunner().invoke(main, ["pose", "train", "--data", data, "--student-kwargs",
                                    "split_ratio=1.5", "--out", str(tmp_path / "r")])
    assert run.exit_code == 1 and "SimCC bins (Dx, Dy) = (36, 48)" in run.output
    # a classification-shaped option on a pose method
    run = CliRunner().invoke(main, ["pose", "train", "--data", data, "--method", "aver",
                                    "--out", str(tmp_path / "r")])
    assert run.exit_code == 1 and "--cache DIR" in run.output

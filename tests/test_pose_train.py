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


@pytest.mark.parametrize("method,backend", [
    ("classroom", "reference"), ("classroom", "triton"),
    pytest.param("kd", "reference", marks=pytest.mark.slow)])
def test_cached_equals_online(pose_env, method, backend):
    """fp32 cache of every view == the mentors run online, bit for bit (CPU), on the eager
    reference and on the fused kernels (interpreted)."""
    base = dict(data=pose_env["data"], student="resnet8-simcc", method=method, epochs=2,
                batch_size=16, progress=False, seed=7, backend=backend)
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
    assert cached["backend"] == backend


def test_fused_training_follows_the_reference(pose_env):
    """`ckd pose train --backend triton` (interpreted) against the eager reference on the
    same cache: the first step's loss agrees to rounding, and training stays close."""
    base = dict(SMALL, data=pose_env["data"], student="resnet8-simcc", method="classroom",
                cache=str(pose_env["root"] / "cache"), seed=3)
    ref = train_pose(dict(base, backend="reference"))["losses"]
    fused = train_pose(dict(base, backend="triton"))["losses"]
    assert fused[0] == pytest.approx(ref[0], rel=1e-5)
    assert fused == pytest.approx(ref, rel=1e-3)


def test_cache_contents_and_verify(pose_env):
    """The pose cache is the project's Zarr store (kind "pose"): rows, PCK and view
    parameters per mentor under the unit markers; verify re-derives the views and
    recomputes rows and PCK bit for bit; a damaged chunk or an edited view is found."""
    import zarr

    from ckd.cache.layout import VERSION
    from ckd.pose.cache import open_pose_cache
    from ckd.pose.views import view_params

    cache = pose_env["root"] / "cache"
    root = zarr.open_group(str(cache), mode="r")
    attrs = root.attrs.asdict()
    assert attrs["format"] == "ckd-logit-cache" and attrs["version"] == VERSION
    assert attrs["kind"] == "pose" and attrs["pose"]["mentors"] == ["t", "p"]
    assert attrs["pose"]["layout"] == {"kind": "simcc", "num_joints": 13, "dims": [48, 64]}
    n = attrs["num_samples"]
    t = root["mentors/t"]
    assert t["logits"].shape == (2, n, 13, 112) and t["logits"].dtype == np.float32
    assert np.array_equal(t["view_params"][1], view_params(0, torch.arange(n), 1).numpy())
    assert t["pck"].shape == (2, n) and np.nanmax(t["pck"][:]) <= 1
    opened = open_pose_cache(cache)
    assert opened.aliases == ["t", "p"] and opened.pck.shape == (2, 2, n)
    run = CliRunner().invoke(main, ["cache", "verify", str(cache), "--recompute", "8",
                                    "--prepared", pose_env["data"]])
    assert run.exit_code == 0 and "OK" in run.output, run.output
    run = CliRunner().invoke(main, ["cache", "info", str(cache)])
    assert run.exit_code == 0, run.output


def test_verify_finds_damage_and_edited_views(pose_env, tmp_path):
    import shutil

    import zarr

    from ckd.cache.writer import record_mentor_digest

    cache = tmp_path / "cache"
    shutil.copytree(pose_env["root"] / "cache", cache)
    # a view whose stored parameters no longer match the keyed view function, written
    # with a consistent marker and digest: only --recompute finds it
    grp = zarr.open_group(str(cache / "mentors" / "p"), mode="r+")
    vp = grp["view_params"][:]
    vp[0, 3, 1] += 1.0
    grp["view_params"][:] = vp
    from ckd.cache.integrity import marker_columns, mentor_specs, unit_marker
    specs = mentor_specs(grp.attrs.asdict())
    named = {s.name: grp[s.name][0:1] for s in specs}
    named["train_correct"] = grp["train_correct"][0:1, 0:1]
    grp["unit_crc32c"][0:1, 0:1] = unit_marker(0, 0, named, marker_columns(specs))
    attrs = json.loads((cache / "zarr.json").read_text())["attributes"]
    attrs["digests"]["mentors"].pop("p")
    zarr.open_group(str(cache), mode="r+").attrs.put(attrs)
    record_mentor_digest(cache, "p")
    assert CliRunner().invoke(main, ["cache", "verify", str(cache)]).exit_code == 0
    run = CliRunner().invoke(main, ["cache", "verify", str(cache), "--recompute", "4"])
    assert run.exit_code == 1 and "differ" in run.output, run.output
    # a damaged chunk: its crc32c fails, named by file
    chunk = cache / "mentors" / "t" / "pck" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")
    run = CliRunner().invoke(main, ["cache", "verify", str(cache)])
    assert run.exit_code == 1 and "mentors/t/pck/c/1/0" in run.output, run.output


def test_old_pose_store_is_refused_with_its_rebuild_command(pose_env, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({
        "version": 1, "task": "pose", "slots": 2, "seed": 0, "dtype": "fp16",
        "storage": "dense", "mentors": [{"name": "resnet8-simcc", "checkpoint": "/m/t.pt"}]}))
    with pytest.raises(ValueError, match=r"older \.npy layout.*ckd cache-logits --prepared "
                                         r"PREPARED_POSE_DIR --mentors /m/t\.pt --views 2"):
        train_pose(dict(SMALL, data=pose_env["data"], method="kd", cache=str(old)))
    run = CliRunner().invoke(main, ["cache", "verify", str(old)])
    assert run.exit_code == 1 and "ckd cache-logits --prepared" in run.output, run.output


def test_topk_heatmap_cache_trains_heatmap_students(pose_env):
    h = pose_env["root"] / "hcache"
    import zarr

    root = zarr.open_group(str(h), mode="r")
    (alias,) = root.attrs["pose"]["mentors"]
    m = root[f"mentors/{alias}"]
    assert m.attrs["logits_mode"] == "topk:16" and root.attrs["pose"]["layout"]["kind"] == \
        "heatmap"
    assert m["topk_logits"].shape[-1] == 16 and "logits" not in m
    res = train_pose(dict(SMALL, data=pose_env["data"], student="resnet8-heatmap",
                          method="classroom", cache=str(h)))
    assert np.isfinite(res["losses"]).all()
    assert res["backend"] == "reference"  # auto: the fused losses read dense rows only
    with pytest.raises(ValueError, match="do not run a top-k .* pass --backend reference"):
        train_pose(dict(SMALL, data=pose_env["data"], student="resnet8-heatmap",
                        method="classroom", cache=str(h), backend="triton"))
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


def test_pose_cache_resumes_and_refuses_a_changed_mentor(pose_env, tmp_path):
    """A deleted chunk is rebuilt byte for byte by rerunning the command; a mentor whose
    checkpoint changed is refused, naming --overwrite."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(pose_env["root"] / "cache", cache)
    chunk = cache / "mentors" / "p" / "logits" / "c" / "1" / "0" / "0" / "0"
    before = chunk.read_bytes()
    chunk.unlink()
    ck = pose_env["ck"]
    args = ["cache-logits", "--prepared", pose_env["data"], "--mentors",
            f"t={ck['t']},p={ck['p']}", "--out", str(cache), "--views", "2", "--dtype", "fp32",
            "--quiet"]
    from ckd.pose.cache import open_pose_cache
    with pytest.raises(ValueError, match="missing chunk files"):
        open_pose_cache(cache)
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert chunk.read_bytes() == before
    assert CliRunner().invoke(main, ["cache", "verify", str(cache)]).exit_code == 0
    state = safe_torch_load(ck["p"])
    state["metrics"] = {"changed": 1.0}
    atomic_save(state, tmp_path / "p2.pt")
    run = CliRunner().invoke(main, [*args[:4], f"t={ck['t']},p={tmp_path / 'p2.pt'}",
                                    *args[5:]])
    assert run.exit_code == 1 and "--overwrite" in run.output, run.output

"""Trainer: config precedence, schedules, methods as data, the loop end to end on tiny
synthetic data (Python API and CLI), clear errors before training, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from ckd.cli.main import main as cli
from ckd.methods import select_mentors
from ckd.train import load_config, make_schedule, train

TINY = dict(n_train=64, n_test=32, num_classes=10, seed=0)
BASE = dict(dataset="synthetic", dataset_options=TINY, student="resnet8", epochs=2,
            batch_size=16, progress=False, device="cpu", backend="reference", log_every=2)


# ----------------------------------------------------------------------------- config
def test_config_yaml_then_flags(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({"epochs": 7, "lr": 0.1, "mentors": "r110,r8",
                                 "milestones": "3,5", "method-params": {"p": 0.3}}))
    cfg = load_config(p, epochs=3, tau=None)  # None: a flag not given never overrides
    assert (cfg.epochs, cfg.lr, cfg.tau) == (3, 0.1, None)
    assert cfg.mentors == ["r110", "r8"] and cfg.milestones == [3, 5]
    assert cfg.method_params == {"p": 0.3}
    p.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown setting 'epoch'"):
        load_config(p)


def test_default_lr_by_student():
    assert load_config(None, student="r20").resolved_lr() == 0.05
    for s in ("mbv2", "MobileNetV2", "sn-v1", "ShuffleV2"):
        assert load_config(None, student=s).resolved_lr() == 0.01
    assert load_config(None, student="mbv2", lr=0.2).resolved_lr() == 0.2


# -------------------------------------------------------------------------- schedules
def test_step_schedule_paper_and_scaled():
    s = make_schedule("step", base_lr=0.05, epochs=240)
    assert s.milestones == (150, 180, 210)
    got = [s.lr_at(e) for e in (0, 149, 150, 179, 180, 210, 239)]
    assert got == pytest.approx([0.05, 0.05, 5e-3, 5e-3, 5e-4, 5e-5, 5e-5])
    assert make_schedule("step", base_lr=0.05, epochs=24).milestones == (15, 18, 21)
    assert make_schedule("step", base_lr=0.05, epochs=24, milestones=[2, 4]).milestones == (2, 4)
    with pytest.raises(ValueError, match="increasing"):
        make_schedule("step", base_lr=0.05, epochs=24, milestones=[4, 2])


def test_classroom_warmup_schedule():
    s = make_schedule("classroom-warmup", base_lr=0.05, epochs=240)
    got = [s.lr_at(e) for e in (0, 60, 119, 120, 149, 150, 180, 210)]
    assert got == pytest.approx([0.05, 0.03, 0.05 - 0.04 * 119 / 120, 0.01, 0.01, 1e-3,
                                 1e-4, 1e-5])
    assert make_schedule("classroom-warmup", base_lr=0.05, epochs=24).warmup_epochs == 12
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", base_lr=0.05, epochs=10)


# ---------------------------------------------------------------------------- methods
def test_methods_are_data():
    plan = load_config(None, method="classroom").loss_plan()
    (term,) = plan.terms
    assert term.params == {"tau": 12.0, "beta": 1.0, "delta": 0.0, "lam": None,
                           "variant": "paper", "granularity": "batch", "rank_logits": None}
    cfg = load_config(None, method="classroom", lam=2, tau=4)
    assert cfg.loss_plan().terms[0].params["lam"] == 2.0
    kd = load_config(None, method="kd", tau=3.0).loss_plan().terms[0].params
    assert kd == {"T": 3.0, "alpha_ce": 1.0, "alpha_kd": 1.0}  # kd's temperature is T
    assert load_config(None, method="nokd").loss_plan().terms[0].params == {}
    dgkd = load_config(None, method="dgkd", method_params={"p": 0.25}).loss_plan()
    assert dgkd.terms[0].params["p"] == 0.25
    assert select_mentors("kd", ["t", "a", "b"]) == ["t"]
    assert select_mentors("aver", ["t", "a"]) == ["t", "a"]
    assert select_mentors("nokd", ["t"]) == []
    with pytest.raises(ValueError, match="needs a teacher"):
        select_mentors("classroom", [])


# -------------------------------------------------------------------------- end to end
def _records(run_dir) -> list[dict]:
    return [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def test_train_nokd_writes_run(tmp_path):
    from ckd.models import load_checkpoint, read_checkpoint_meta

    out = tmp_path / "run"
    res = train(dict(BASE, dataset_options=dict(TINY, n_train=48), method="nokd",
                     out=str(out)))
    assert res["steps"] == 2 * 3 and res["run_dir"] == str(out)
    assert 0.0 <= res["last_acc"] <= res["best_acc"] <= 100.0
    recs = _records(out)
    assert recs[0]["type"] == "run" and recs[0]["mentors"] == []
    epochs = [r for r in recs if r["type"] == "epoch"]
    steps = [r for r in recs if r["type"] == "step"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    # log_every=2 over 3 steps an epoch: at step 2 and at the epoch's last step
    assert [s["step"] for s in steps] == [2, 3, 4, 6] and all(s["img_per_s"] > 0 for s in steps)
    assert [s["lr"] for s in steps] == pytest.approx([0.05, 0.05, 0.005, 0.005])  # 2 epochs:
    saved = yaml.safe_load((out / "config.yaml").read_text())  # milestones scale to 1, 2, 2
    assert saved["epochs"] == 2 and saved["lr"] is None and saved["out"] == str(out)
    assert load_config(out / "config.yaml").epochs == 2  # the resolved config reloads
    meta = read_checkpoint_meta(out / "student.pt")
    assert meta["dataset"] == "synthetic" and meta["metrics"]["test_acc"] == res["last_acc"]
    model = load_checkpoint(out / "student.pt")
    for a, b in zip(model.state_dict().values(), res["model"].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_train_nokd_learns(tmp_path):
    res = train(dict(BASE, dataset_options=dict(TINY, n_train=128), method="nokd",
                     epochs=4, out=str(tmp_path / "run")))
    assert res["best_acc"] >= res["last_acc"] > 30.0  # 10 classes: chance is 10 %
    ep = res["history"]
    assert ep[-1]["train_loss"] < ep[0]["train_loss"]


def test_existing_run_needs_resume(tmp_path):
    train(dict(BASE, method="nokd", epochs=1, out=str(tmp_path / "r")))
    with pytest.raises(FileExistsError, match="--resume"):
        train(dict(BASE, method="nokd", epochs=1, out=str(tmp_path / "r")))


def test_method_without_mentors_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="needs"):
        train(dict(BASE, method="classroom", out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def _mentor_ckpt(path: Path, seed: int, num_classes: int = 10) -> str:
    from ckd.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(path, create_model("resnet8", num_classes), arch="resnet8",
                    num_classes=num_classes, dataset="synthetic", metrics={})
    return str(path)


def test_cache_mismatch_is_refused(tmp_path):
    from ckd.cache import CacheMismatchError, build_cache
    from ckd.data import load_dataset

    ds = load_dataset("synthetic", **dict(TINY, n_train=16))
    cache = build_cache(ds, {"t": _mentor_ckpt(tmp_path / "t.pt", 0)}, tmp_path / "c",
                        views=1, progress=False)
    cfg = dict(BASE, method="kd", cache=str(cache), out=str(tmp_path / "r"))
    with pytest.raises(CacheMismatchError, match="fingerprint"):  # other images
        train(dict(cfg, dataset_options=dict(TINY, n_train=16, seed=1)))
    with pytest.raises(CacheMismatchError, match="class count"):
        train(dict(cfg, dataset_options=dict(TINY, n_train=16, num_classes=5)))
    with pytest.raises(ValueError, match="not in the cache"):
        train(dict(cfg, dataset_options=dict(TINY, n_train=16), mentors=["r110"]))
    assert not (tmp_path / "r").exists()
    res = train(dict(cfg, dataset_options=dict(TINY, n_train=16), epochs=1))
    assert res["mentors"] == ["t"]


def test_cli_train_mentor_train_online_and_report(tmp_path):
    from ckd.models import read_checkpoint_meta

    r = CliRunner()
    common = ["--dataset", "synthetic", "-D", "n_train=32", "-D", "n_test=16",
              "--batch-size", "16", "--device", "cpu", "--no-progress"]
    res = r.invoke(cli, ["train-mentor", "--arch", "resnet8", "--epochs", "2",
                         "--mentor-dir", str(tmp_path / "mentors"),
                         "--out", str(tmp_path / "mrun"), *common])
    assert res.exit_code == 0, res.output
    meta = read_checkpoint_meta(tmp_path / "mentors" / "synthetic" / "resnet8.pt")
    assert meta["arch"] == "resnet8" and meta["dataset"] == "synthetic"
    assert 0.0 <= meta["metrics"]["test_acc"] <= 100.0
    assert "mentor checkpoint" in res.output

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"method": "classroom", "epochs": 5, "log_every": 1,
                                   "backend": "reference"}))
    peer = _mentor_ckpt(tmp_path / "peer.pt", 7)
    res = r.invoke(cli, ["train", "--config", str(cfg), "--epochs", "2", "--student",
                         "resnet8", "--mentors-online", "--mentors", f"r8,peer={peer}",
                         "--mentor-dir", str(tmp_path / "mentors"),
                         "--out", str(tmp_path / "cls"), *common])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp_path / "cls" / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["method"] == "classroom"  # flag beat the file
    steps = [x for x in _records(tmp_path / "cls") if x["type"] == "step"]
    assert len(steps) == 4 and all(len(s["mentor_rank"]) == 2 for s in steps)
    assert all(s["student_rank"] > 0 for s in steps)

    res = r.invoke(cli, ["train", "--method", "aver", "--dataset", "synthetic"])
    assert res.exit_code != 0 and "needs" in res.output  # no mentors: clear error

    res = r.invoke(cli, ["report", str(tmp_path / "mrun"), str(tmp_path / "cls"),
                         "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    for name in ("accuracy.png", "ranks.png", "temperatures.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| mrun | nokd | resnet8 |" in md and "| cls | classroom | resnet8 |" in md


@pytest.mark.slow  # ffcv's numba compilation: ~20 s
def test_prepared_ffcv_matches_memory_loader(tmp_path):
    from ckd.data import load_dataset
    from ckd.data.beton import write_betons

    opts = dict(TINY, n_train=32, n_test=16)
    write_betons(load_dataset("synthetic", **opts), tmp_path / "prep")
    cfg = dict(BASE, dataset_options=opts, method="nokd", epochs=1)
    a = train(dict(cfg, out=str(tmp_path / "mem")))
    b = train(dict(cfg, dataset=None, dataset_options={}, prepared=str(tmp_path / "prep"),
                   loader="ffcv", out=str(tmp_path / "ffcv")))
    assert b["dataset"] == "synthetic" and a["last_acc"] == b["last_acc"]
    la = [r["loss"] for r in _records(tmp_path / "mem") if r["type"] == "step"]
    lb = [r["loss"] for r in _records(tmp_path / "ffcv") if r["type"] == "step"]
    assert la == pytest.approx(lb, abs=1e-5)  # same batches, same order
    # ffcv's worker threads change oneDNN's thread use: reductions may round differently
    diff = max((p.float() - q.float()).abs().max().item() for p, q in
               zip(a["model"].state_dict().values(), b["model"].state_dict().values(),
                   strict=True))
    assert diff < 1e-3, diff

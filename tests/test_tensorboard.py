"""`--tensorboard DIR`: a run's scalars (loss terms, accuracies, lr, mentor ranks and
temperatures, step time) and mentor histograms, read back from the event files; `ckd report`
still works from metrics.jsonl; without the package, one line naming the fix."""

from __future__ import annotations

import builtins

import torch
from click.testing import CliRunner

from ckd.cli.main import main as cli


def _mentor(path, seed):
    from ckd.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(path, create_model("resnet8", 10), arch="resnet8", num_classes=10,
                    dataset="synthetic", metrics={})
    return path


COMMON = ["--dataset", "synthetic", "-D", "n_train=32", "-D", "n_test=16", "-D",
          "num_classes=10", "--batch-size", "16", "--device", "cpu", "--no-progress",
          "--log-every", "1"]


def test_train_writes_tensorboard_and_report_still_works(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, b = _mentor(tmp_path / "a.pt", 0), _mentor(tmp_path / "b.pt", 1)
    res = CliRunner().invoke(cli, [
        "train", "--method", "classroom", "--backend", "reference", "--epochs", "2",
        "--student", "resnet8", "--mentors-online", "--mentors", f"a={a},b={b}",
        "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"), *COMMON])
    assert res.exit_code == 0, res.output
    acc = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/acc", "lr", "time/step_s", "time/img_per_s",
                "mentors/mentor_rank/a", "mentors/mentor_rank/b", "mentors/mentor_temp/a",
                "mentors/mentor_active/b", "epoch/test_acc", "epoch/train_loss"):
        assert tag in scalars, (tag, sorted(scalars))
    assert {"mentors/mentor_rank", "mentors/mentor_active"} <= set(acc.Tags()["histograms"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]  # every step record, by optimizer step
    import json

    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if '"step"' in x and json.loads(x)["type"] == "step"]
    assert [round(e.value, 5) for e in loss] == [round(s["loss"], 5) for s in steps]
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "run"), "--out",
                                   str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ModuleNotFoundError("No module named 'tensorboard'")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    res = CliRunner().invoke(cli, ["train", "--method", "nokd", "--epochs", "1",
                                   "--student", "resnet8", "--out", str(tmp_path / "run"),
                                   "--tensorboard", str(tmp_path / "tb"), *COMMON])
    assert res.exit_code == 1
    assert "--tensorboard needs the tensorboard package" in res.output
    assert "pip install tensorboard" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any work


def test_adapt_mentor_writes_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    src = _mentor(tmp_path / "m.pt", 0)
    res = CliRunner().invoke(cli, [
        "adapt-mentor", "--checkpoint", str(src), "--student", "resnet8", "--out",
        str(tmp_path / "aid.pt"), "--dataset", "synthetic", "-D", "n_train=32", "-D",
        "n_test=16", "-D", "num_classes=10", "--epochs", "2", "--warmup-epochs", "1",
        "--batch-size", "16", "--margin", "100", "--no-progress", "--tensorboard",
        str(tmp_path / "tb")])
    assert res.exit_code == 0, res.output
    acc = EventAccumulator(str(tmp_path / "tb" / "aid"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"loss/ce", "loss/intra", "loss/inter_drift", "lr", "epoch/test_acc"} <= set(
        scalars)
    assert [e.step for e in acc.Scalars("loss/intra")] == [1, 2]  # the adaptation epochs
    assert [e.step for e in acc.Scalars("epoch/test_acc")] == [0, 3]  # before, after

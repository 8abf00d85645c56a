"""Several students from one pass (`--student r8,wrn_16_1`): each equals the same student
trained alone (same final weights), with its own folder, optimizer, schedule and --resume."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ckd.cli.main import main as cli
from ckd.train import train

TINY = dict(n_train=48, n_test=16, num_classes=10, seed=0)
CFG = dict(dataset="synthetic", dataset_options=TINY, method="kd", batch_size=16,
           progress=False, device="cpu", backend="reference", log_every=1, milestones=[1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from ckd.cache import build_cache
    from ckd.data import load_dataset
    from ckd.models import create_model, save_checkpoint

    tmp = tmp_path_factory.mktemp("multi")
    torch.manual_seed(3)
    save_checkpoint(tmp / "t.pt", create_model("resnet8", 10), arch="resnet8",
                    num_classes=10, dataset="synthetic", metrics={})
    return str(build_cache(load_dataset("synthetic", **TINY), {"t": str(tmp / "t.pt")},
                           tmp / "cache", views=2, progress=False))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


def test_students_side_by_side_equal_students_alone(tmp_path, cache):
    students = ["resnet8", "wrn_16_1"]
    both = train(dict(CFG, cache=cache, student=",".join(students), epochs=2,
                      out=str(tmp_path / "both")))
    assert [r["run_dir"] for r in both["students"]] == [str(tmp_path / "both" / s)
                                                       for s in students]
    for name, joint in zip(students, both["students"], strict=True):
        alone = train(dict(CFG, cache=cache, student=name, epochs=2,
                           out=str(tmp_path / f"alone-{name}")))
        _same(joint["model"], alone["model"])
        assert joint["last_acc"] == alone["last_acc"] and joint["steps"] == alone["steps"] == 6
        sub = tmp_path / "both" / name
        for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "student.pt"):
            assert (sub / f).is_file(), f
        recs = [json.loads(x) for x in (sub / "metrics.jsonl").read_text().splitlines()]
        ref = [json.loads(x) for x in (tmp_path / f"alone-{name}" / "metrics.jsonl")
               .read_text().splitlines()]
        assert recs[0]["student"] == name
        assert [r["loss"] for r in recs if r["type"] == "step"] == \
            [r["loss"] for r in ref if r["type"] == "step"]


@pytest.mark.slow  # four short runs: ~20 s of CPU
def test_students_resume_together(tmp_path, cache):
    cfg = dict(CFG, cache=cache, student="resnet8,resnet14")
    full = train(dict(cfg, epochs=2, out=str(tmp_path / "full")))
    train(dict(cfg, epochs=1, out=str(tmp_path / "part")))
    resumed = train(dict(cfg, epochs=2, out=str(tmp_path / "part"), resume=True,
                         resume_allow=["epochs"]))
    for a, b in zip(full["students"], resumed["students"], strict=True):
        _same(a["model"], b["model"])
        assert [h["epoch"] for h in b["history"]] == [1]  # only the missing epoch ran
    # a folder whose students stopped at different epochs is refused, naming the fix
    train(dict(cfg, student="resnet8", epochs=3, out=str(tmp_path / "part" / "resnet8"),
               resume=True, resume_allow=["epochs"]))
    with pytest.raises(ValueError, match="different epochs"):
        train(dict(cfg, epochs=4, out=str(tmp_path / "part"), resume=True,
                   resume_allow=["epochs"]))


def test_cli_several_students_and_bad_lists(tmp_path, cache):
    args = ["train", "--dataset", "synthetic", *[f"-D{k}={v}" for k, v in TINY.items()],
            "--cache", cache, "--method", "kd", "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--no-progress", "--backend", "reference"]
    res = CliRunner().invoke(cli, [*args, "--student", "r8,vit_tiny", "--out",
                                   str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "student r8:" in res.output and "student vit_tiny:" in res.output
    res = CliRunner().invoke(cli, [*args, "--student", "r8,r8", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "twice" in res.output
    res = CliRunner().invoke(cli, [*args, "--student", "r8,nosuch", "--out",
                                   str(tmp_path / "y")])
    assert res.exit_code != 0 and "unknown architecture 'nosuch'" in res.output

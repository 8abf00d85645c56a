"""Every bad value is refused at the CLI/config boundary before work starts: the message
names the option, the value's valid range, and no traceback reaches the user (`ckd --debug`
shows it)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ckd.cli.main import main as cli

NO_GPU = not torch.cuda.is_available()
READ_ONLY = "/sys/ckd-validation-test"  # a read-only mount, even for root


def train_args(tmp):
    return ["train", "--dataset", "synthetic", "-D", "n_train=32", "-D", "n_test=16",
            "--student", "resnet8", "--method", "nokd", "--epochs", "5", "--device", "cpu",
            "--backend", "reference", "--no-progress", "--out", str(tmp / "run")]


def cache_args(tmp):
    return ["cache-logits", "--dataset", "synthetic", "-D", "n_train=8", "--mentors",
            f"r8={tmp / 'r8.pt'}", "--out", str(tmp / "cache"), "--device", "cpu"]


def prepare_args(tmp):
    return ["prepare", "synthetic", "--out", str(tmp / "prepared")]


def mentor_args(tmp):
    return ["train-mentor", "--arch", "resnet8", "--dataset", "synthetic", "-D", "n_train=32",
            "--epochs", "1", "--device", "cpu", "--no-progress",
            "--mentor-dir", str(tmp / "mentors")]


BASE = {"train": train_args, "cache": cache_args, "prepare": prepare_args,
        "mentor": mentor_args}

# (command, extra arguments, option named, range named)
CASES = [
    ("train", ["--batch-size", "0"], "--batch-size", ">= 1"),
    ("train", ["--epochs", "0"], "--epochs", ">= 1"),
    ("train", ["--epochs", "-3"], "--epochs", ">= 1"),
    ("train", ["--lr", "0"], "--lr", "> 0"),
    ("train", ["--lr", "-0.1"], "--lr", "> 0"),
    ("train", ["--momentum", "1.5"], "--momentum", "< 1"),
    ("train", ["--weight-decay", "-1"], "--weight-decay", ">= 0"),
    ("train", ["--log-every", "0"], "--log-every", ">= 1"),
    ("train", ["--max-steps-per-epoch", "0"], "--max-steps-per-epoch", ">= 1"),
    ("train", ["--seed", "-1"], "--seed", ">= 0"),
    ("train", ["--milestones", "3,2"], "--milestones", "increasing"),
    ("train", ["--milestones", "1,9"], "--milestones", "[1, 5]"),
    ("train", ["--milestones", "a,b"], "--milestones", "comma list of integer"),
    ("train", ["--schedule", "classroom-warmup", "--warmup-epochs", "9"], "--warmup-epochs",
     "< --epochs 5"),
    ("train", ["--method", "kd", "--tau", "0"], "T=0.0", "> 0"),
    ("train", ["--method", "classroom", "--tau", "-4"], "tau=-4.0", "> 0"),
    ("train", ["--method", "classroom", "--lam", "-1"], "lam=-1.0", "> 0"),
    ("train", ["--method", "classroom", "--beta", "0"], "beta=0.0", "> 0"),
    ("train", ["--method", "classroom", "--delta", "-1"], "delta=-1.0", ">= 0"),
    ("train", ["--method", "classroom", "--variant", "authors"], "variant='authors'",
     "one of paper, official"),
    ("train", ["--method", "kd", "--param", "alpha_kd=0"], "alpha_kd=0", "> 0"),
    ("train", ["--method", "kd", "--param", "alpha_ce=-1"], "alpha_ce=-1", ">= 0"),
    ("train", ["--method", "dgkd", "--param", "p=1"], "p=1", "< 1"),
    ("train", ["--method", "dkd", "--param", "warmup=0"], "warmup=0", ">= 1"),
    ("train", ["--method", "kd", "--param", "nope=1"], "nope", "its parameters: kd: T, alpha_ce"),
    ("train", ["--method", "kd", "--preset", "nope"], "--preset nope", "repdistiller"),
    ("train", ["--method", "kd", "--beta", "2"], "--beta", "T, alpha_ce, alpha_kd"),
    ("train", ["--method", "kd+classroom"], "--method", "at most one"),
    ("train", ["--method", "0*kd"], "--method", "> 0"),
    ("train", ["--method", "kdd"], "--method", "nokd, kd, aver"),
    ("train", ["-D", "n_train=0"], "n_train=0", ">= 1"),
    ("train", ["-D", "num_classes=1"], "num_classes=1", ">= 2"),
    ("train", ["-D", "bogus=1"], "bogus", "n_train, n_test, num_classes, seed"),
    ("train", ["--device", "tpu"], "--device", "cpu, cuda or cuda:N"),
    ("train", ["--out", READ_ONLY], "--out", "cannot write"),
    ("train", ["--prepared", "/nonexistent/prepared"], "--prepared", "does not exist"),
    ("train", ["--cache", "/nonexistent/cache"], "--cache", "does not exist"),
    ("cache", ["--batch-size", "0"], "--batch-size", ">= 1"),
    ("cache", ["--views", "0"], "--views", "K >= 1"),
    ("cache", ["--views", "163"], "--views", "[1, 162]"),
    ("cache", ["--views", "some"], "--views", "K >= 1"),
    ("cache", ["--samples-per-chunk", "0"], "--samples-per-chunk", ">= 1"),
    ("cache", ["--seed", "-2"], "--seed", ">= 0"),
    ("cache", ["--device", "gpu0"], "--device", "cpu, cuda or cuda:N"),
    ("cache", ["--out", READ_ONLY], "--out", "cannot write"),
    ("cache", ["-D", "n_test=0"], "n_test=0", ">= 1"),
    ("cache", ["--logits", "topk:10"], "--logits", "K = 10 >= C = 10"),
    ("cache", ["--logits", "sample:0"], "--logits", "S >= 1"),
    ("cache", ["--logits", "top5"], "--logits", "use dense, topk:K or sample:S"),
    ("prepare", ["--n-train", "0"], "n_train=0", ">= 1"),
    ("prepare", ["--num-classes", "1"], "num_classes=1", ">= 2"),
    ("prepare", ["--seed", "-1"], "seed=-1", ">= 0"),
    ("prepare", ["--out", READ_ONLY], "--out", "cannot write"),
    ("prepare", ["--quality", "0"], "--quality", "1<=x<=100"),
    ("prepare", ["--workers", "0"], "--workers", "x>=1"),
    ("prepare", ["--max-side", "-5"], "--max-side", "x>=1"),
    ("mentor", ["--batch-size", "0"], "--batch-size", ">= 1"),
    ("mentor", ["--lr", "-1"], "--lr", "> 0"),
    ("mentor", ["--epochs", "0"], "--epochs", ">= 1"),
    ("mentor", ["--mentor-dir", READ_ONLY], "--mentor-dir", "cannot write"),
]
if NO_GPU:
    CASES += [(cmd, ["--device", "cuda"], "--device", "no CUDA GPU")
              for cmd in ("train", "cache", "mentor")]


@pytest.mark.parametrize("command,extra,option,valid", CASES,
                         ids=[f"{c}{'_'.join(e)}" for c, e, _, _ in CASES])
def test_bad_value_is_refused_by_name(tmp_path, command, extra, option, valid):
    res = CliRunner().invoke(cli, BASE[command](tmp_path) + extra)
    assert res.exit_code in (1, 2), res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # no raw exception
    assert option in res.output and valid in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    res = CliRunner().invoke(cli, train_args(tmp_path) + ["--out", str(tmp_path / "f")])
    assert res.exit_code in (1, 2) and "--out" in res.output and "is a file" in res.output


def test_triton_backend_needs_cuda_or_the_interpreter(tmp_path, monkeypatch):
    if not NO_GPU:
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = train_args(tmp_path) + ["--backend", "triton"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "--backend triton needs a CUDA device" in res.output
    assert "TRITON_INTERPRET=1" in res.output


def test_config_file_values_are_checked_too(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("batch_size: -4\n")
    res = CliRunner().invoke(cli, train_args(tmp_path) + ["--config", str(cfg)])
    assert res.exit_code == 1 and "--batch-size=-4 is invalid: must be an integer >= 1" \
        in res.output


def test_debug_shows_the_traceback(tmp_path):
    res = CliRunner().invoke(cli, ["--debug"] + train_args(tmp_path) + ["--epochs", "0"])
    assert isinstance(res.exception, ValueError) and "--epochs=0" in str(res.exception)

"""What a user sees when a run goes wrong: one line (`Error: ...`, exit code 1) naming what
failed and what to try, never a raw traceback, for every error class ckd raises
(ckd/cli/errors.py); `ckd --debug` keeps the traceback. Each case is the command a user
types."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckd.cli.main import main as cli

sys.path.insert(0, str(Path(__file__).parent))
from test_cache_robust import mentor  # noqa: E402

DATA = ["--dataset", "synthetic", "-D", "n_train=64", "-D", "num_classes=5"]

STUDENTS = '''
import torch
from torch import nn


class Plain(nn.Module):  # no is_feat: logit methods only
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class WithFeat(Plain):
    def forward(self, x, is_feat=False):
        f = self.body(x)
        return ([f], self.fc(f)) if is_feat else self.fc(f)


class NoParams(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return x.flatten(1)[:, :self.num_classes] * 0


class FirstTwo(Plain):  # right at the 2-image probe, wrong for any other batch size
    def forward(self, x):
        return self.fc(self.body(x))[:2]


class NaNOut(Plain):
    def forward(self, x):
        return self.fc(self.body(x)) * float("nan")
'''


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_line_error(res, *needles: str, code: int = 1) -> str:
    """The command failed with exit `code` on one `Error:` line holding every needle, and
    no exception (hence no traceback) escaped."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A resnet8 mentor (5 classes), a NaN copy of it, a dense cache with pooled features
    and a module of outside students on sys.path."""
    tmp = tmp_path_factory.mktemp("errors")
    good = mentor(tmp / "r8.pt", 0)
    ckpt = torch.load(good, weights_only=False)
    for v in ckpt["state_dict"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(ckpt, tmp / "nan.pt")
    res = run("cache-logits", *DATA, "--mentors", f"r8={good}", "--out", str(tmp / "cache"),
              "--device", "cpu", "--views", "2", "--quiet", "--features", "pool")
    assert res.exit_code == 0, res.output
    (tmp / "ckd_test_students.py").write_text(textwrap.dedent(STUDENTS))
    sys.path.insert(0, str(tmp))
    yield dict(tmp=tmp, good=good, nan=tmp / "nan.pt", cache=tmp / "cache")
    sys.path.remove(str(tmp))


def train(c, tmp_path, *extra: str):
    return run("train", *DATA, "--cache", str(c["cache"]), "--epochs", "1", "--batch-size",
               "16", "--device", "cpu", "--no-progress", "--backend", "reference",
               "--out", str(tmp_path / "run"), *extra)


# ------------------------------------------------------------ non-finite values (case 13)
def test_divergence_names_the_step_and_the_fix(caches, tmp_path):
    base = ("--student", "resnet8", "--method", "kd", "--log-every", "1")
    assert train(caches, tmp_path, *base).exit_code == 0  # one good epoch, checkpointed
    res = train(caches, tmp_path, *base, "--lr", "1e12", "--epochs", "3", "--resume",
                "--resume-allow", "epochs,lr")
    one_line_error(res, "training stopped at step", "(epoch 2/3", "student logits",
                   "lower the learning rate")
    # the last finished epoch is kept: resumed with the old lr, the run completes
    res = train(caches, tmp_path, *base, "--epochs", "3", "--resume", "--resume-allow",
                "epochs")
    assert res.exit_code == 0, res.output


def test_nan_student_names_the_step(caches, tmp_path):
    res = train(caches, tmp_path, "--student", "ckd_test_students:NaNOut", "--method", "kd")
    one_line_error(res, "training stopped at steps 1..4 (epoch 1/1", "student logits")


def test_nan_online_mentor_is_named(caches, tmp_path):
    res = run("train", *DATA, "--epochs", "1", "--batch-size", "16", "--device", "cpu",
              "--no-progress", "--backend", "reference", "--out", str(tmp_path / "run"),
              "--student", "resnet8", "--method", "kd", "--mentors-online", "--mentors",
              f"bad={caches['nan']}")
    one_line_error(res, "training stopped at steps 1..4", "mentor logits",
                   "the mentors run online here", "retrain or replace it")


def test_nan_mentor_in_cache_logits_is_named(caches, tmp_path):
    out = tmp_path / "c"
    res = run("cache-logits", *DATA, "--mentors", f"r8={caches['good']},bad={caches['nan']}",
              "--out", str(out), "--device", "cpu", "--views", "2", "--quiet")
    one_line_error(res, "mentor 'bad'", "non-finite logits", "retrain or replace it")
    # the store stays usable: the same command without the broken mentor completes it
    res = run("cache-logits", *DATA, "--mentors", f"r8={caches['good']}", "--out", str(out),
              "--device", "cpu", "--views", "2", "--quiet")
    assert res.exit_code == 0, res.output


def test_debug_keeps_the_traceback(caches, tmp_path):
    from ckd.kernels import NonFiniteError

    res = CliRunner().invoke(cli, ["--debug", "train", *DATA, "--cache", str(caches["cache"]),
                                   "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                                   "--no-progress", "--backend", "reference", "--out",
                                   str(tmp_path / "run"), "--student",
                                   "ckd_test_students:NaNOut", "--method", "kd"])
    assert isinstance(res.exception, NonFiniteError)


# ------------------------------------------------- students (cases 14, 20, 28, 29, 30)
@pytest.mark.parametrize("student,kwargs,method", [
    ("vit_tiny", "dim=48", "fitnet"), ("vit_tiny", "dim=48", "crd"),
    ("mamba_tiny", "dim=32", "sdkd")])
def test_feature_methods_use_the_students_real_shapes(caches, tmp_path, student, kwargs,
                                                      method):
    res = train(caches, tmp_path, "--student", student, "--student-kwargs", kwargs,
                "--method", method, "--max-steps-per-epoch", "1")
    assert res.exit_code == 0, res.output


def test_outside_student_with_feature_methods(caches, tmp_path):
    res = train(caches, tmp_path, "--student", "ckd_test_students:WithFeat", "--method",
                "crd", "--max-steps-per-epoch", "1")
    assert res.exit_code == 0, res.output
    res = train(caches, tmp_path, "--student", "ckd_test_students:Plain", "--method",
                "fitnet", "--overwrite")
    one_line_error(res, "student 'ckd_test_students:Plain'", "forward(x, is_feat=True)",
                   "or use a logit method")
    assert "unknown architecture" not in res.output


@pytest.mark.parametrize("extra,needles", [
    (["--student", "mamba_tiny", "--student-kwargs", "dim=0"],
     ["mamba_tiny cannot be built with --student-kwargs dim=0", "choose other values"]),
    (["--student", "ckd_test_students:NoParams"], ["has no trainable parameters"]),
    (["--student", "ckd_test_students:FirstTwo"],
     ["returned logits of shape (2, 5) for a batch of 16 images", "every batch size"]),
])
def test_students_that_cannot_train_are_refused_by_name(caches, tmp_path, extra, needles):
    res = train(caches, tmp_path, "--method", "kd", *extra)
    line = one_line_error(res, *needles)
    assert "labels must be" not in line and "does not require grad" not in line


# ---------------------------------------------------- cache-logits refusals (18, 24)
def test_features_with_sparse_logits_are_refused_before_any_work(caches, tmp_path):
    out = tmp_path / "c"
    res = run("cache-logits", *DATA, "--mentors", f"r8={caches['good']}", "--out", str(out),
              "--device", "cpu", "--views", "2", "--quiet", "--features", "pool",
              "--logits", "topk:3")
    one_line_error(res, "--features with sparse --logits (r8=topk:3)", "--logits dense")
    assert not out.exists()


def test_sample_size_is_bounded_by_the_classes(caches, tmp_path):
    out = tmp_path / "c"
    res = run("cache-logits", *DATA, "--mentors", f"r8={caches['good']}", "--out", str(out),
              "--device", "cpu", "--views", "2", "--quiet", "--logits", "sample:99999999999")
    one_line_error(res, "sample:99999999999", "C = 5 classes", "S <= 5")
    assert not out.exists()


def test_sample_size_on_an_object_store(s3, caches):
    from ckd.cache.location import cache_location

    res = run("cache-logits", *DATA, "--mentors", f"r8={caches['good']}", "--out",
              f"{s3}/big", "--device", "cpu", "--views", "2", "--quiet", "--logits",
              "sample:99999999999")
    one_line_error(res, "sample:99999999999", "S <= 5")
    assert not cache_location(f"{s3}/big").keys()


def test_plain_http_endpoint_names_aws_allow_http(s3, caches, monkeypatch):
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    res = run("cache-logits", *DATA, "--mentors", f"r8={caches['good']}", "--out",
              f"{s3}/http", "--device", "cpu", "--views", "2", "--quiet")
    one_line_error(res, f"{s3}/http", "is plain http", "export AWS_ALLOW_HTTP=true")


# ------------------------------------------------------------------ resume (case 19)
def test_resume_with_another_feature_method_is_named(caches, tmp_path):
    res = train(caches, tmp_path, "--student", "resnet8", "--method", "kd+0.8*crd")
    assert res.exit_code == 0, res.output
    res = train(caches, tmp_path, "--student", "resnet8", "--method", "kd", "--epochs", "2",
                "--resume", "--resume-allow", "epochs,method")
    line = one_line_error(res, "holds the trainable modules of a feature method",
                          "--method kd does not have", "resume with the method")
    assert "parameter groups" not in line
    res = train(caches, tmp_path, "--student", "resnet8", "--method", "kd+0.8*crd",
                "--param", "crd.feat_dim=64", "--epochs", "2", "--resume", "--resume-allow",
                "epochs,method_params")
    one_line_error(res, "crd.embed_s.linear.bias (128,) -> (64,)", "crd.feat_dim")


# ------------------------------------------------------------- damaged stores (22, 27)
def _flip(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def test_truncated_array_metadata_is_named_by_the_repair_command(caches, tmp_path):
    import shutil

    store = tmp_path / "c"
    shutil.copytree(caches["cache"], store)
    meta = store / "mentors" / "r8" / "logits" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    args = ["cache-logits", *DATA, "--mentors", f"r8={caches['good']}", "--out", str(store),
            "--device", "cpu", "--views", "2", "--quiet", "--features", "pool"]
    one_line_error(run(*args), f"cannot read {meta}", f"delete {store / 'mentors' / 'r8'}")
    shutil.rmtree(store / "mentors" / "r8")  # the repair the line names
    assert run(*args).exit_code == 0
    assert run("cache", "verify", str(store)).exit_code == 0


def test_verify_names_every_damaged_array_of_a_unit(caches, tmp_path):
    import shutil

    store = tmp_path / "c"
    shutil.copytree(caches["cache"], store)
    for name in ("logits", "pool"):
        _flip(store / "mentors" / "r8" / name / "c" / "0" / "0" / "0")
    res = run("cache", "verify", str(store))
    assert res.exit_code == 1 and "2 problem(s)" in res.output, res.output
    for name in ("logits", "pool"):
        assert f"PROBLEM cannot read {store}/mentors/r8/{name}/c/0/0/0" in res.output


# -------------------------------------------------- aid and image folders (15-17, 23-26)
def test_analyze_refuses_a_sparse_cache_by_name(caches, tmp_path):
    sparse = tmp_path / "topk"
    res = run("cache-logits", *DATA, "--mentors", f"r8={caches['good']}", "--out",
              str(sparse), "--device", "cpu", "--views", "2", "--quiet", "--logits", "topk:3")
    assert res.exit_code == 0, res.output
    res = train(caches, tmp_path, "--student", "resnet8", "--method", "kd",
                "--max-steps-per-epoch", "1")
    assert res.exit_code == 0, res.output
    res = run("analyze", "--cache", str(sparse), "--mentor", "r8", "--student",
              str(tmp_path / "run"), "--out", str(tmp_path / "an"))
    one_line_error(res, "reads dense mentor logits", "'r8'", "topk:3", "--logits dense")
    assert not (tmp_path / "an").exists()


@pytest.fixture(scope="module")
def image_cache(prepared_images, tmp_path_factory):
    from ckd.models import create_model, save_checkpoint

    tmp = tmp_path_factory.mktemp("imgerrors")
    torch.manual_seed(0)
    save_checkpoint(tmp / "r8.pt", create_model("resnet8", 3), arch="resnet8", num_classes=3,
                    dataset="imagefolder", metrics=None)
    # more views than the CIFAR recipe's 162 distinct ones: crops are continuous (case 26)
    res = run("cache-logits", "--prepared", str(prepared_images), "--mentors",
              f"r8={tmp / 'r8.pt'}", "--out", str(tmp / "cache"), "--views", "200",
              "--samples-per-chunk", "8", "--batch-size", "8", "--quiet")
    assert res.exit_code == 0, res.output
    return dict(tmp=tmp, mentor=tmp / "r8.pt", cache=tmp / "cache", prepared=prepared_images)


@pytest.mark.slow  # an image-folder cache of 200 views and an image-folder training run
def test_image_folder_refusals_name_what_works(image_cache, tmp_path):
    c = image_cache
    common = ["--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    res = run("train", "--prepared", str(c["prepared"]), "--cache", str(c["cache"]),
              "--backend", "reference", "--student", "resnet8", "--method", "fitnet",
              "--out", str(tmp_path / "run"), *common)
    line = one_line_error(res, "reads mentor features", "image folder", "logit method")
    assert "--features pool" not in line  # what cache-logits refuses for image folders
    # a mentor trains on an image folder from its own keyed crops (no cache needed)
    res = run("train-mentor", "--arch", "resnet8", "--prepared", str(c["prepared"]),
              "--mentor-dir", str(tmp_path / "mentors"), "--out", str(tmp_path / "m"),
              "--max-steps-per-epoch", "1", *common)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mentors" / "imagefolder" / "resnet8.pt").is_file()
    res = run("adapt-mentor", "--checkpoint", str(c["mentor"]), "--student", "resnet8",
              "--prepared", str(c["prepared"]), "--out", str(tmp_path / "ad.pt"))
    one_line_error(res, "ckd adapt-mentor works on CIFAR-style data", "image folder")
    assert not (tmp_path / "ad.pt").exists()
    res = run("train", "--prepared", str(c["prepared"]), "--cache", str(c["cache"]),
              "--backend", "reference", "--student", "resnet8", "--method", "kd",
              "--max-steps-per-epoch", "1", "--out", str(tmp_path / "kd"), *common)
    assert res.exit_code == 0, res.output
    res = run("analyze", "--cache", str(c["cache"]), "--mentor", "r8", "--student",
              str(tmp_path / "kd"), "--out", str(tmp_path / "an"))
    one_line_error(res, "ckd analyze works on CIFAR-style data", "image folder")


# ------------------------------------------------ NaN and inf, class-wide (case 31, 6)
def _float_options(command, path=()):
    import click

    for p in command.params:
        if isinstance(p, click.Option) and p.type.name == "float":
            yield " ".join(path), p
    for name, sub in getattr(command, "commands", {}).items():
        yield from _float_options(sub, (*path, name))


def test_every_float_option_of_the_cli_refuses_nan_and_inf():
    from ckd.cli.params import Finite

    found = list(_float_options(cli))
    assert len(found) >= 10  # train's and the aid commands' floats at least
    for where, p in found:
        assert isinstance(p.type, Finite), f"{where} {p.opts}"


ADAPT = ["adapt-mentor", "--student", "resnet8", *DATA, "--epochs", "1"]


@pytest.mark.parametrize("option", ["--lam", "--anchor", "--tau", "--lr", "--student-lr",
                                    "--margin"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_adapt_mentor_refuses_non_finite_values(caches, tmp_path, option, value):
    out = tmp_path / "adapted.pt"
    res = run(*ADAPT, "--checkpoint", str(caches["good"]), "--out", str(out), option, value)
    one_line_error(res, option, "must be a finite number", code=2)
    assert not out.exists()


@pytest.mark.parametrize("extra,named", [
    (["--lr", "nan"], "--lr"), (["--momentum", "inf"], "--momentum"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--tau", "inf"], "--tau"),
    (["--method", "classroom", "--beta", "nan"], "--beta"),
    (["--method", "classroom", "--delta", "inf"], "--delta"),
    (["--method", "classroom", "--lam", "nan"], "--lam"),
    (["--param", "T=.nan"], "T=nan"), (["--param", "alpha_kd=.inf"], "alpha_kd=inf"),
])
def test_train_refuses_non_finite_values(caches, tmp_path, extra, named):
    res = train(caches, tmp_path, "--student", "resnet8", "--method", "kd", *extra)
    one_line_error(res, named, code=res.exit_code)
    assert res.exit_code in (1, 2) and not (tmp_path / "run").exists()


def test_config_file_non_finite_values_are_refused(caches, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("lr: .nan\ngamma: .inf\n")
    res = train(caches, tmp_path, "--student", "resnet8", "--method", "kd", "--config",
                str(cfg))
    one_line_error(res, "--lr=nan is invalid")


def test_analyze_refuses_a_non_finite_tau(caches, tmp_path):
    res = run("analyze", "--cache", str(caches["cache"]), "--mentor", "r8", "--student",
              str(tmp_path), "--out", str(tmp_path / "an"), "--tau", "nan")
    one_line_error(res, "--tau", "must be a finite number", code=2)


def test_each_error_class_maps_to_one_line():
    from ckd.cache.layout import CacheReadError
    from ckd.cache.location import ObjectStoreError
    from ckd.cli.errors import error_line
    from ckd.kernels import NonFiniteError
    from ckd.locks import LockedError

    own = [ValueError("bad --x"), CacheReadError("cannot read f"), OSError("disk full"),
           ObjectStoreError("s3://b: no credentials"), FileExistsError("f exists"),
           NonFiniteError("student logits"), FloatingPointError("mentor 'b'"),
           OverflowError("beyond float16"), ImportError("pip install 'ckd[s3]'"),
           LockedError("held by pid 7")]
    for err in own:
        assert error_line(err, "train") == str(err), type(err)
    assert error_line(KeyError("mentor 'x' not loaded; loaded: ['a']"), "train") == \
        "mentor 'x' not loaded; loaded: ['a']"  # unquoted
    line = error_line(RuntimeError("size mismatch\nfor a.weight ...\nfor b.weight ..."),
                      "train")
    assert line == ("RuntimeError: size mismatch ... (run `ckd --debug train ...` for the "
                    "traceback)")
    assert error_line(TypeError("x"), "cache-logits").startswith("TypeError: x (run `ckd")
    assert error_line(AttributeError("a bug"), "train") is None  # keeps its traceback
    assert error_line(ZeroDivisionError("x"), "train").startswith("ZeroDivisionError: x")

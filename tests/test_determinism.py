"""`--deterministic` (ckd.determinism): the switch sets torch's deterministic state and
restores the previous one (nothing leaks into other tests), checks cuBLAS's workspace
setting, refuses an op without a deterministic kernel by name (`put_` has none, on CPU
too) through `ckd train` and `ckd cache-logits`, and is recorded so a resume keeps it."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import yaml
from click.testing import CliRunner

from ckd import determinism
from ckd.determinism import CUBLAS_KEY, DeterminismError, deterministic


def _torch_state() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


@pytest.fixture(autouse=True)
def restore_torch_state():
    """Whatever a test does, the next one starts from the state this one found."""
    before = _torch_state()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def _put(x: torch.Tensor) -> torch.Tensor:
    """An op torch has no deterministic kernel for, on CPU as on CUDA."""
    return x.clone().put_(torch.tensor([0], device=x.device), x.reshape(-1)[:1])


def test_switch_sets_the_state_and_restores_the_previous_one():
    torch.backends.cudnn.benchmark = True  # a caller's own setting survives the block
    before = _torch_state()
    with deterministic():
        assert _torch_state() == (True, False, True, False)
        assert os.environ[CUBLAS_KEY] in determinism.CUBLAS_DETERMINISTIC
    assert _torch_state() == before
    with deterministic(warn_only=True):
        assert _torch_state() == (True, True, True, False)
    assert _torch_state() == before
    with deterministic(False):  # off: nothing changes
        assert _torch_state() == before


def test_op_without_deterministic_kernel_is_refused_by_name():
    x = torch.arange(4.0)
    _put(x)  # fine without the switch
    with pytest.raises(DeterminismError, match=r"--deterministic: the op put_ has no "
                       r"deterministic implementation.*drop --deterministic"), \
            deterministic():
        _put(x)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the error
    with pytest.raises(ValueError, match="unrelated"), deterministic():
        raise ValueError("unrelated")  # other errors pass through unchanged


def test_cublas_workspace_is_set_before_cuda_and_checked_after(monkeypatch):
    monkeypatch.delenv(CUBLAS_KEY, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    determinism.check_cublas_workspace()
    assert os.environ[CUBLAS_KEY] == ":4096:8"
    monkeypatch.setenv(CUBLAS_KEY, ":16:8")  # the other deterministic value is kept
    determinism.check_cublas_workspace()
    assert os.environ[CUBLAS_KEY] == ":16:8"
    # CUDA already running with another value: cuBLAS would not read a new one
    monkeypatch.setenv(CUBLAS_KEY, ":0:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(DeterminismError, match=r"CUBLAS_WORKSPACE_CONFIG=:4096:8 ckd .*"
                       r"drop --deterministic"):
        with deterministic():
            pass
    assert os.environ[CUBLAS_KEY] == ":0:0"


def test_cublas_refusal_message_names_the_variable():
    err = RuntimeError("Deterministic behavior was enabled with either "
                       "`torch.use_deterministic_algorithms(True)` or ..., but this operation "
                       "is not deterministic because it uses CuBLAS and you have CUDA >= 10.2")
    assert determinism.nondeterministic_op(err) == "cuBLAS"
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in determinism.refusal("cuBLAS")


# ------------------------------------------------------------------ ckd train
TRAIN = ["train", "--dataset", "synthetic", "-D", "n_train=16", "-D", "n_test=8", "-D",
         "num_classes=10", "--method", "nokd", "--batch-size", "8", "--device", "cpu",
         "--no-progress", "--backend", "reference"]


def _run(*args: str):
    pytest.importorskip("zarr")  # the CLI's cache commands (gpu_check.sh may lack it)
    from ckd.cli.main import main as cli

    return CliRunner().invoke(cli, [*args], catch_exceptions=False)


def test_train_records_the_setting_and_resume_must_match(tmp_path):
    out = str(tmp_path / "run")
    res = _run(*TRAIN, "--student", "resnet8", "--epochs", "1", "--deterministic",
               "--out", out)
    assert res.exit_code == 0, res.output
    assert not torch.are_deterministic_algorithms_enabled()  # train() restores the state
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["deterministic"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["config"]["deterministic"] is True

    res = _run(*TRAIN, "--student", "resnet8", "--epochs", "2", "--out", out, "--resume",
               "--resume-allow", "epochs")
    assert res.exit_code == 1
    assert "deterministic: was True, now False" in res.output, res.output
    assert "--resume-allow deterministic" in res.output, res.output
    res = _run(*TRAIN, "--student", "resnet8", "--epochs", "2", "--out", out, "--resume",
               "--resume-allow", "epochs", "--deterministic")
    assert res.exit_code == 0, res.output


@pytest.fixture()
def put_student(tmp_path, monkeypatch):
    """A student (module.path:ClassName) whose forward uses `put_`."""
    (tmp_path / "put_student.py").write_text(textwrap.dedent("""
        import torch

        class PutNet(torch.nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.fc = torch.nn.Linear(3 * 32 * 32, num_classes)

            def forward(self, x):
                z = self.fc(x.flatten(1))
                return z + torch.zeros_like(z).put_(torch.tensor([0], device=z.device),
                                                    z.reshape(-1)[:1])
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "put_student:PutNet"


def test_train_refuses_a_nondeterministic_op_by_name(tmp_path, put_student):
    res = _run(*TRAIN, "--student", put_student, "--epochs", "1", "--deterministic",
               "--out", str(tmp_path / "det"))
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --deterministic: the op put_ "), \
        res.output
    assert "drop --deterministic" in lines[0]
    assert not torch.are_deterministic_algorithms_enabled()
    res = _run(*TRAIN, "--student", put_student, "--epochs", "1", "--out",
               str(tmp_path / "free"))
    assert res.exit_code == 0, res.output  # the same run without the flag trains


# ------------------------------------------------------------------ ckd cache-logits
CACHE = ["cache-logits", "--dataset", "synthetic", "-D", "n_train=16", "-D", "n_test=8",
         "--views", "2", "--batch-size", "16", "--device", "cpu", "--quiet"]


def _mentor_attrs(store, alias: str) -> dict:
    import zarr

    from ckd.cache.location import zarr_store

    return zarr.open_group(zarr_store(store), path=f"mentors/{alias}", mode="r").attrs.asdict()


def test_cache_logits_records_the_setting_and_resume_must_match(tmp_path):
    from test_cache_robust import mentor

    ckpt = mentor(tmp_path / "t.pt", 0, num_classes=10)
    out = tmp_path / "cache"
    res = _run(*CACHE, "--mentors", f"t={ckpt}", "--out", str(out), "--deterministic")
    assert res.exit_code == 0, res.output
    assert not torch.are_deterministic_algorithms_enabled()
    assert _mentor_attrs(out, "t")["deterministic"] is True
    res = _run(*CACHE, "--mentors", f"u={ckpt}", "--out", str(out))  # another mentor, as
    assert res.exit_code == 0, res.output                            # the user asks
    assert _mentor_attrs(out, "t")["deterministic"] is True  # complete: left as recorded
    assert _mentor_attrs(out, "u")["deterministic"] is False

    import zarr

    from ckd.cache.location import zarr_store

    grp = zarr.open_group(zarr_store(out), path="mentors/t", mode="r+")
    grp.attrs.put({**grp.attrs.asdict(), "complete": False})  # as if killed mid-way
    res = _run(*CACHE, "--mentors", f"t={ckpt}", "--out", str(out))
    assert res.exit_code == 1
    assert "'t'" in res.output and "was started with --deterministic: resume it with " \
        "--deterministic" in res.output, res.output
    res = _run(*CACHE, "--mentors", f"t={ckpt}", "--out", str(out), "--deterministic")
    assert res.exit_code == 0, res.output
    assert _mentor_attrs(out, "t")["complete"] is True


def test_cache_logits_refuses_a_nondeterministic_op_by_name(tmp_path, monkeypatch):
    from test_cache_robust import mentor

    import ckd.cache.writer as writer

    load = writer.load_mentor

    class PutMentor(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return _put(self.inner(x))

    monkeypatch.setattr(writer, "load_mentor", lambda *a, **k: PutMentor(load(*a, **k)))
    ckpt = mentor(tmp_path / "t.pt", 0, num_classes=10)
    res = _run(*CACHE, "--mentors", f"t={ckpt}", "--out", str(tmp_path / "c"),
               "--deterministic")
    assert res.exit_code == 1
    assert "Error: --deterministic: the op put_ has no deterministic implementation" in \
        res.output and "drop --deterministic" in res.output, res.output


# ------------------------------------------------------------------ the zoo under it
def test_global_avg_pool_paths_agree():
    """The deterministic path (avg_pool2d over the whole map, taken for CUDA tensors under
    deterministic algorithms) computes the adaptive pool's mean."""
    import torch.nn.functional as F

    from ckd.models.layers import global_avg_pool

    for h, w in ((8, 8), (7, 5), (1, 1)):
        x = torch.randn(3, 4, h, w, requires_grad=True)
        whole = torch.flatten(F.avg_pool2d(x, (h, w)), 1)
        torch.testing.assert_close(whole, global_avg_pool(x), rtol=1e-6, atol=1e-7)
        g, = torch.autograd.grad(whole.sum(), x)
        torch.testing.assert_close(g, torch.full_like(x, 1.0 / (h * w)))


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8", "ShuffleV1"])
def test_zoo_students_train_under_deterministic_algorithms(arch):
    """A training step of each zoo family under deterministic algorithms raises nothing (on
    a GPU: adaptive_avg_pool2d's CUDA backward would, so the zoo pools deterministically),
    and two such steps from the same weights give the same gradients bit for bit."""
    from device import DEVICE

    from ckd.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).to(DEVICE)
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    grads = []
    with deterministic():
        for _ in range(2):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_flag_changes_no_result_on_cpu(tmp_path):
    """On CPU the claims hold without the flag, and with it the run is the same bit for bit
    (classroom from a cache, the fused loss under the Triton interpreter): the newly
    allocated memory it fills with NaN is never read."""
    pytest.importorskip("zarr")
    from test_cache_robust import mentor

    from ckd.cache import build_cache
    from ckd.data import load_dataset
    from ckd.train import train

    opts = dict(n_train=16, n_test=8, num_classes=10, seed=0)
    paths = {a: str(mentor(tmp_path / f"{a}.pt", s, num_classes=10))
             for a, s in (("t", 0), ("p", 1))}
    cache = build_cache(load_dataset("synthetic", **opts), paths, tmp_path / "cache", views=2,
                        progress=False)
    cfg = dict(dataset="synthetic", dataset_options=opts, student="resnet8", epochs=1,
               batch_size=8, progress=False, device="cpu", log_every=1, seed=1,
               method="classroom", cache=str(cache), mentors=["t", "p"])
    runs = [train(dict(cfg, deterministic=det, out=str(tmp_path / f"det{det}")))
            for det in (False, True)]
    for a, b in zip(runs[0]["model"].state_dict().values(),
                    runs[1]["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert runs[0]["history"][0]["train_loss"] == runs[1]["history"][0]["train_loss"]

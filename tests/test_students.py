"""Students beyond CNNs: the vision Mamba (selective scan against a scalar loop), the ViT,
parameter counts, learning, and any outside nn.Module named module.path:ClassName."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from ckd.cli.main import main as cli
from ckd.models import count_params, create_model, list_models, load_checkpoint, save_checkpoint
from ckd.models.mamba import _fused_scan, selective_scan_parallel, selective_scan_sequential
from ckd.train import train

NEW = ("mamba_tiny", "mamba_small", "vit_tiny", "vit_small")
TINY = dict(n_train=32, n_test=16, num_classes=10, seed=0)
BASE = dict(dataset="synthetic", dataset_options=TINY, epochs=1, batch_size=16, lr=0.01,
            progress=False, device="cpu", backend="reference", method="nokd")


# ------------------------------------------------------------------------------ scan
def _scan_inputs(b=2, d=3, n=2, L=5, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g, dtype=torch.float64)
    delta = torch.rand(b, d, L, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 3
    B = torch.randn(b, n, L, generator=g, dtype=torch.float64)
    C = torch.randn(b, n, L, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    ts = (u, delta, A, B, C, D)
    return tuple(t.requires_grad_(grad) for t in ts)


def _scalar_loop(u, delta, A, B, C, D):
    """The recurrence with Python floats, one (batch, channel, state) at a time."""
    b, d, L = u.shape
    y = torch.zeros(b, d, L, dtype=torch.float64)
    for i in range(b):
        for c in range(d):
            h = [0.0] * A.shape[1]
            for t in range(L):
                dt, x = float(delta[i, c, t]), float(u[i, c, t])
                acc = 0.0
                for s in range(A.shape[1]):
                    h[s] = math.exp(dt * float(A[c, s])) * h[s] + dt * float(B[i, s, t]) * x
                    acc += float(C[i, s, t]) * h[s]
                y[i, c, t] = acc + float(D[c]) * x
    return y


@pytest.mark.parametrize("L", [1, 5, 8])
def test_scans_equal_scalar_loop(L):
    args = _scan_inputs(L=L)
    want = _scalar_loop(*args)
    torch.testing.assert_close(selective_scan_sequential(*args), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(selective_scan_parallel(*args), want, rtol=1e-10, atol=1e-10)


def test_parallel_scan_equals_sequential_with_gradients():
    a1 = _scan_inputs(b=3, d=8, n=4, L=37, seed=1, grad=True)  # L not a power of two
    a2 = tuple(t.detach().clone().requires_grad_(True) for t in a1)
    y1, y2 = selective_scan_sequential(*a1), selective_scan_parallel(*a2)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    for p, q in zip(a1, a2, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(_fused_scan is None or not torch.cuda.is_available(),
                    reason="mamba_ssm not installed or no CUDA")
def test_fused_scan_equals_reference():  # pragma: no cover - needs CUDA + mamba_ssm
    args = [t.float().cuda() for t in _scan_inputs(b=2, d=16, n=8, L=64)]
    torch.testing.assert_close(_fused_scan(*args[:5], args[5]),
                               selective_scan_sequential(*args), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ zoo
@pytest.mark.parametrize("name", NEW)
def test_new_students_shapes(name):
    model = create_model(name, 10)
    sizes = (16,) if name == "mamba_small" else (32, 16)  # CIFAR, and the demo's digits
    with torch.no_grad():
        for size in sizes:
            assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_param_counts_listed():
    rows = {r["name"]: r["params"] for r in list_models(10)}
    for name in NEW:
        assert rows[name] == count_params(create_model(name, 10))
    assert rows["mamba_tiny"] < rows["mamba_small"] and rows["vit_tiny"] < rows["vit_small"]
    out = CliRunner().invoke(cli, ["models", "--num-classes", "10"]).output
    assert all(n in out for n in NEW)
    # kwargs change the model: a deeper tiny Mamba has more parameters
    deeper = create_model("mamba_tiny", 10, depth=6)
    assert count_params(deeper) > rows["mamba_tiny"]
    with pytest.raises(ValueError, match="takes no keyword"):
        create_model("resnet8", 10, depth=3)


@pytest.mark.parametrize("name", ["mamba_tiny", "vit_tiny"])
def test_a_few_steps_decrease_the_loss(name):
    torch.manual_seed(0)
    model = create_model(name, 10, dim=32, depth=2) if name.startswith("mamba") \
        else create_model(name, 10, dim=48, depth=2)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_checkpoint_round_trip_with_kwargs(tmp_path):
    model = create_model("mamba_tiny", 10, dim=32, depth=2)
    save_checkpoint(tmp_path / "m.pt", model, arch="vim-t", arch_kwargs={"dim": 32, "depth": 2},
                    num_classes=10, dataset="synthetic", metrics={})
    back = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(back(x), model.eval()(x))


# ---------------------------------------------------------------- outside students
MODULE = """
import torch
from torch import nn

class TinyMLP(nn.Module):
    def __init__(self, num_classes=10, hidden=16):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, hidden),
                                 nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)

class Features(nn.Module):  # returns features, not [B, C] logits
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)

def not_a_module():
    return 3
"""


@pytest.fixture
def outside_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mypkg.mod"
    for name in ("mypkg.mod", "mypkg"):
        sys.modules.pop(name, None)


def test_cli_trains_outside_student(tmp_path, outside_pkg):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, [
        "train", "--dataset", "synthetic", "-D", "n_train=32", "-D", "n_test=16",
        "--student", f"{outside_pkg}:TinyMLP", "--student-kwargs", "hidden=24",
        "--method", "nokd", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
        "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    back = load_checkpoint(out / "student.pt")  # rebuilt from the import path + kwargs
    assert back.net[2].out_features == 24
    x = torch.randn(2, 3, 32, 32)
    trained = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(trained[k], v) for k, v in back.state_dict().items())
    assert back(x).shape == (2, 10)


def test_bad_outside_students_refused_before_training(tmp_path, outside_pkg):
    for student, match in [
        (f"{outside_pkg}:not_a_module", "not an nn.Module"),
        (f"{outside_pkg}:Missing", "has no 'Missing'"),
        ("nosuchpkg.mod:X", "cannot import module"),
        (f"{outside_pkg}:Features", r"to \(2, 4, 30, 30\).*\[2, 10\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(dict(BASE, student=student, out=str(tmp_path / "r")))
        assert not list((tmp_path / "r").glob("*.pt"))  # no step was taken
    with pytest.raises(ValueError, match="refused the keyword"):
        train(dict(BASE, student=f"{outside_pkg}:TinyMLP", student_kwargs={"widht": 3},
                   out=str(tmp_path / "r")))


@pytest.mark.slow  # trains a (small) vision Mamba: ~15 s of CPU
def test_trained_students_are_mentors(tmp_path):
    """Progressive distillation's link: a trained student (its run folder, here a vision
    Mamba with kwargs) is a mentor for cache-logits; the cached logits are its logits."""
    from ckd.cache import open_cache
    from ckd.data import load_dataset
    from ckd.data.views import apply_views

    run = tmp_path / "mamba"
    train(dict(BASE, student="mamba_tiny", student_kwargs={"dim": 16, "depth": 1},
               out=str(run)))
    data = ["--dataset", "synthetic", *[f"-D{k}={v}" for k, v in TINY.items()]]
    res = CliRunner().invoke(cli, ["cache-logits", *data, "--mentors", f"m={run}",
                                   "--views", "1", "--out", str(tmp_path / "c"),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cache = open_cache(tmp_path / "c", mentors=["m"])
    ds = load_dataset("synthetic", **TINY)
    idx = torch.arange(8)
    slots, vids = cache.epoch_views(0, idx, 0)
    model = load_checkpoint(run / "student.pt")
    with torch.no_grad():
        want = model(apply_views(torch.from_numpy(ds.train.images[:8]), vids, ds.mean, ds.std))
    torch.testing.assert_close(cache.gather(slots, idx)[0].float(), want, atol=2e-2, rtol=1e-2)
    # the student's checkpoint file itself is a mentor too, added to the same cache
    res = CliRunner().invoke(cli, ["cache-logits", *data, "--mentors",
                                   f"m2={run / 'student.pt'}", "--views", "1", "--out",
                                   str(tmp_path / "c"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    both = open_cache(tmp_path / "c", mentors=["m", "m2"]).gather(slots, idx)
    assert torch.equal(both[0], both[1])
    res = CliRunner().invoke(cli, ["cache-logits", *data, "--mentors", f"x={tmp_path}",
                                   "--out", str(tmp_path / "c2"), "--device", "cpu"])
    assert res.exit_code != 0 and "holds no student.pt" in res.output

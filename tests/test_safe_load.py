"""No file that ckd reads can run code: crafted run checkpoints, mentor checkpoints and
CIFAR archives whose unpickling would create a marker file are refused with a clear error,
and the marker never appears. Also: the one atomic write leaves no temp file on failure."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from source_ast import package_trees

from ckd.atomic import atomic_save, atomic_write_text


class Payload:
    """Unpickling this runs `touch marker` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft_torch_file(path: Path, marker: Path, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(1)}, "rng": Payload(marker), **extra}, path)
    return path


def test_payload_really_runs_under_unsafe_load(tmp_path):
    """The fixture is a real attack: a plain unpickle of it creates the marker."""
    marker = tmp_path / "pwned"
    torch.load(_craft_torch_file(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


TRAIN = ["--dataset", "synthetic", "-D", "n_train=32", "-D", "n_test=16", "--student",
         "resnet8", "--method", "nokd", "--epochs", "1", "--batch-size", "16",
         "--device", "cpu", "--no-progress", "--backend", "reference"]


@pytest.mark.parametrize("resume", [False, True])
def test_crafted_run_checkpoint_is_refused(tmp_path, resume):
    """`checkpoint.pt` in an --out folder is read before --resume is checked."""
    from click.testing import CliRunner

    from ckd.cli.main import main as cli

    marker, run = tmp_path / "pwned", tmp_path / "run"
    _craft_torch_file(run / "checkpoint.pt", marker, epoch=0, step=0)
    res = CliRunner().invoke(cli, ["train", *TRAIN, "--out", str(run),
                                   *(["--resume"] if resume else [])])
    assert res.exit_code != 0
    assert not marker.exists(), "the crafted checkpoint ran its payload"
    assert "checkpoint.pt" in res.output and "refuses to unpickle" in res.output
    assert "delete" in res.output  # says what to do
    assert "Traceback" not in res.output


def test_training_state_roundtrips_under_weights_only(tmp_path):
    """RNG states are stored as tensors/lists, so weights_only loading restores them."""
    import random

    from ckd.train.checkpoint import load_training_state, rng_state, save_training_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    random.random(), np.random.rand(), torch.rand(1)
    rng = rng_state()
    save_training_state(tmp_path, model=model, optimizer=opt, schedule={"lr": 0.1}, epoch=1,
                        step=3, best_acc=1.0, last_acc=0.5, config={"a": [1, 2]})
    expect = (random.random(), np.random.rand(), float(torch.rand(1)))
    state = load_training_state(tmp_path, torch.device("cpu"))
    assert state["epoch"] == 1 and state["config"] == {"a": [1, 2]}
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    from ckd.train.checkpoint import set_rng_state

    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), float(torch.rand(1))) == expect
    assert torch.equal(rng["torch"], state["rng"]["torch"])


def test_crafted_mentor_checkpoint_is_refused(tmp_path):
    from click.testing import CliRunner

    from ckd.cli.main import main as cli

    marker = tmp_path / "pwned"
    ckpt = _craft_torch_file(tmp_path / "r8.pt", marker)
    res = CliRunner().invoke(cli, ["cache-logits", "--dataset", "synthetic", "-D",
                                   "n_train=16", "-D", "n_test=8", "--mentors", f"r8={ckpt}",
                                   "--out", str(tmp_path / "cache"), "--views", "1",
                                   "--device", "cpu", "--quiet"])
    assert res.exit_code != 0 and not marker.exists()
    assert "r8.pt" in res.output and "refuses to unpickle" in res.output


def _cifar_folder(root: Path, payload_file: str, marker: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                 b"labels": [0, 1], b"batch_label": b"x"}
        if name == payload_file:
            entry[b"batch_label"] = Payload(marker)
        (folder / name).write_bytes(pickle.dumps(entry))
    return folder


def test_crafted_cifar_archive_is_refused(tmp_path):
    from ckd.data import load_dataset

    marker = tmp_path / "pwned"
    _cifar_folder(tmp_path, "data_batch_3", marker)
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists(), "the crafted CIFAR batch ran its payload"
    msg = str(err.value)
    assert "data_batch_3" in msg and "refused global posix.system" in msg.replace("os.", "posix.")
    assert "official" in msg


def test_cifar_archive_with_numpy_arrays_still_loads(tmp_path):
    from ckd.data import load_dataset

    _cifar_folder(tmp_path, "none", tmp_path / "unused")
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.train.images.shape == (10, 32, 32, 3) and ds.test.labels.tolist() == [0, 1]


def test_no_unsafe_loader_left_in_the_package():
    """Every torch.load call passes weights_only=True, nothing calls pickle.load(s) or
    yaml.load, and the only Unpickler is the restricted CIFAR one."""
    import ast

    bad = []
    for path, tree in package_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", None)
                name = f"{owner}.{node.func.attr}"
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords)
                if (name == "torch.load" and not safe) or name in (
                        "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load"):
                    bad.append(f"{path.name}:{node.lineno} {name}")
            if isinstance(node, ast.ClassDef) and "Unpickler" in ast.unparse(node.bases[0] if
                                                                          node.bases else node):
                if node.name != "_CifarUnpickler":
                    bad.append(f"{path.name}:{node.lineno} {node.name}")
    assert not bad, bad


def test_atomic_writes_leave_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f.pt"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": 1}, path)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.pt"]


def test_one_atomic_write_in_the_package():
    """os.replace / rename live only in ckd/atomic.py (one atomic write, one folder swap)."""
    root = Path(__file__).resolve().parents[1] / "ckd"
    hits = [str(p.relative_to(root)) for p in root.rglob("*.py")
            if "os.replace(" in p.read_text() or ".rename(" in p.read_text()]
    assert hits == ["atomic.py"], hits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

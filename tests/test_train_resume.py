"""Robustness: a `ckd train` process killed with SIGKILL after its first epoch checkpoint
resumes (`--resume`) to the same final weights as an uninterrupted run; in-process resume
keeps the per-step random streams (tekap noise keyed by seed/step) and the schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckd.train import train

TINY = dict(n_train=32, n_test=16, num_classes=10, seed=0)
EPOCHS = 4
ARGS = ["--dataset", "synthetic", "-D", "n_train=48", "-D", "n_test=16", "--student",
        "resnet8", "--method", "nokd", "--epochs", str(EPOCHS), "--batch-size", "16",
        "--device", "cpu", "--no-progress", "--backend", "reference", "--log-every", "1"]


def _ckd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckd.cli.main", "train", *args]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow  # three processes importing torch: ~20-30 s on 2 shared cores
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen(_ckd(*ARGS, "--out", str(killed)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= done < EPOCHS, "the run was not interrupted mid-training"
    assert not (killed / "student.pt").exists()

    res = subprocess.run(_ckd(*ARGS, "--out", str(killed), "--resume"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # the uninterrupted run, in this process (same code path as the CLI)
    train(dict(dataset="synthetic", dataset_options=dict(n_train=48, n_test=16),
               student="resnet8", method="nokd", epochs=EPOCHS, batch_size=16, device="cpu",
               progress=False, backend="reference", log_every=1, out=str(ref)))
    a, b = _weights(killed / "student.pt"), _weights(ref / "student.pt")
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-6, rtol=0), k
    # metrics of the resumed run read like one uninterrupted run (no duplicated records)
    recs = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    ref_recs = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == list(range(EPOCHS))
    losses = [r["loss"] for r in recs if r["type"] == "step"]
    assert losses == pytest.approx([r["loss"] for r in ref_recs if r["type"] == "step"],
                                   abs=1e-6)


def test_resume_in_process_keeps_random_streams(tmp_path):
    """tekap draws noise keyed by (seed, step): a resumed run must restore the step
    counter; the schedule (explicit milestones) must continue, not restart."""
    from ckd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    teacher = tmp_path / "t.pt"
    save_checkpoint(teacher, create_model("resnet8", 10), arch="resnet8", num_classes=10,
                    dataset="synthetic", metrics={})
    cfg = dict(dataset="synthetic", dataset_options=TINY, student="resnet8", method="tekap",
               mentors_online=True, mentors=[f"t={teacher}"], batch_size=16,
               progress=False, device="cpu", backend="reference", milestones=[1],
               log_every=1)
    full = train(dict(cfg, epochs=2, out=str(tmp_path / "full")))
    train(dict(cfg, epochs=1, out=str(tmp_path / "part")))
    resumed = train(dict(cfg, epochs=2, out=str(tmp_path / "part"), resume=True,
                         resume_allow=["epochs"]))
    assert resumed["steps"] == full["steps"] == 4
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([0.005])  # epoch 1 only
    for (k, p), q in zip(full["model"].state_dict().items(),
                         resumed["model"].state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), k
    assert resumed["best_acc"] == full["best_acc"]
    assert os.path.exists(tmp_path / "part" / "student.pt")
    with pytest.raises(ValueError, match="other settings"):  # another experiment's folder
        train(dict(cfg, method="kd", epochs=2, out=str(tmp_path / "part"), resume=True,
                   resume_allow=["epochs"]))

"""Nothing overwritten or interleaved without a word: one writer per run folder, --resume
only with the run's own settings, --overwrite stated, mentors never silently replaced,
online mentors checked against the cache they are compared with, and worker processes
that end with their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from ckd.locks import LockedError, exclusive_lock
from ckd.train import train, train_mentor
from ckd.train.checkpoint import load_training_state

TINY = dict(n_train=32, n_test=16, num_classes=10, seed=0)
BASE = dict(dataset="synthetic", dataset_options=TINY, student="resnet8", method="nokd",
            epochs=1, batch_size=16, progress=False, device="cpu", backend="reference",
            log_every=1)


def test_second_writer_of_a_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with exclusive_lock(out, holder="test", busy=LockedError):  # another holder, in effect
        with pytest.raises(LockedError, match=rf"in use by another ckd process \(pid "
                                              rf"{os.getpid()}: test\).*another --out"):
            train(dict(BASE, out=str(out)))
    assert not (out / "checkpoint.pt").exists()
    train(dict(BASE, out=str(out)))  # released with the block: the run goes ahead


def test_lock_dies_with_its_process(tmp_path):
    code = ("import sys, time; from ckd.locks import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1], holder='x', busy=RuntimeError):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {proc.pid}"), \
            exclusive_lock(tmp_path, holder="y", busy=LockedError):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with exclusive_lock(tmp_path, holder="y", busy=LockedError):  # no stale lock after kill -9
        pass


def test_resume_refuses_changed_settings_unless_allowed(tmp_path):
    out = str(tmp_path / "run")
    train(dict(BASE, out=out))
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite"):
        train(dict(BASE, out=out, epochs=2))
    with pytest.raises(ValueError, match=r"epochs: was 1, now 2; lr: was None, now 0.1.*"
                                         r"--resume-allow epochs,lr"):
        train(dict(BASE, out=out, epochs=2, lr=0.1, resume=True))
    before = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 1" in before  # the refused resume rewrote nothing
    res = train(dict(BASE, out=out, epochs=2, resume=True, resume_allow=["epochs"],
                     log_every=50))
    assert [h["epoch"] for h in res["history"]] == [1]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"type": "config_change", "epoch": 1, "field": "epochs", "old": 1,
            "new": 2} in recs


def test_overwrite_starts_over(tmp_path):
    out = str(tmp_path / "run")
    train(dict(BASE, out=out, epochs=2))
    res = train(dict(BASE, out=out, overwrite=True))
    assert res["steps"] == 2 and [h["epoch"] for h in res["history"]] == [0]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [0]
    assert load_training_state(tmp_path / "run", torch.device("cpu"))["epoch"] == 1


def test_train_mentor_never_replaces_a_mentor_silently(tmp_path):
    mentors = tmp_path / "mentors"
    kw = dict(out=str(tmp_path / "m1"), mentor_dir=str(mentors),
              **{k: v for k, v in BASE.items() if k not in ("student", "method")})
    kw.pop("dataset")
    first = train_mentor("resnet8", "synthetic", **kw)
    before = (mentors / "synthetic" / "resnet8.pt").read_bytes()
    kw["out"] = str(tmp_path / "m2")
    with pytest.raises(FileExistsError, match="--overwrite to replace it"):
        train_mentor("resnet8", "synthetic", **kw)
    assert not (tmp_path / "m2").exists()  # refused before any training
    assert (mentors / "synthetic" / "resnet8.pt").read_bytes() == before
    again = train_mentor("resnet8", "synthetic", overwrite=True, **kw)
    assert again["mentor_path"] == first["mentor_path"]


def test_online_mentor_must_be_the_cached_checkpoint(tmp_path):
    from ckd.cache.writer import build_cache
    from ckd.data import load_dataset
    from ckd.models import create_model, save_checkpoint

    ds = load_dataset("synthetic", **TINY)
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, create_model("resnet8", 10), arch="resnet8", num_classes=10,
                    dataset="synthetic", metrics={})
    cache = tmp_path / "cache"
    build_cache(ds, {"resnet8": ckpt}, cache, views=1, progress=False)
    cfg = dict(BASE, method="kd", cache=str(cache), mentors_online=True,
               mentors=[f"resnet8={ckpt}"])
    train(dict(cfg, out=str(tmp_path / "ok")))  # the cached checkpoint: accepted
    torch.manual_seed(1)  # another mentor in the same file name
    save_checkpoint(ckpt, create_model("resnet8", 10), arch="resnet8", num_classes=10,
                    dataset="synthetic", metrics={})
    with pytest.raises(ValueError, match="is not the checkpoint the cache .* was built from"):
        train(dict(cfg, out=str(tmp_path / "bad")))


@pytest.mark.slow  # generates 100k synthetic images to keep the writer busy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
def test_killed_prepare_leaves_no_worker_behind(tmp_path):
    """`ckd prepare` forks FFCV writer workers; a kill -9 of the command ends them too."""
    cmd = [sys.executable, "-m", "ckd.cli.main", "prepare", "synthetic", "--out",
           str(tmp_path / "p"), "--n-train", "100000", "--n-test", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 600
    children: list[psutil.Process] = []
    while not children and proc.poll() is None and time.time() < deadline:
        children = parent.children(recursive=True)
        time.sleep(0.02)
    assert children, "prepare started no worker process (nothing to test)"
    time.sleep(0.3)  # let the workers get going
    children = parent.children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"workers outlived the killed command: {[p.pid for p in alive]}"

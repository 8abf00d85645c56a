"""DDP under torchrun, 2 CPU processes (gloo): each rank trains on its own share of the
batches and of the cached logits, and the ranks stay in sync (identical parameters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent("""
    import sys
    import torch
    from ckd.train import train

    out, cache = sys.argv[1], sys.argv[2]
    res = train(dict(dataset="synthetic", dataset_options=dict(n_train=32, n_test=16),
                     student="resnet8", method="classroom", cache=cache, epochs=2,
                     batch_size=8, device="cpu", progress=False, backend="reference",
                     log_every=1, out=out + "/run"))
    torch.save({"state": res["model"].state_dict(), "steps": res["steps"],
                "world": res["world_size"], "best": res["best_acc"]},
               f"{out}/rank{res['rank']}.pt")
""")


@pytest.fixture()
def tiny_cache(tmp_path) -> str:
    from ckd.cache import build_cache
    from ckd.data import load_dataset
    from ckd.models import create_model, save_checkpoint

    ds = load_dataset("synthetic", n_train=32, n_test=16)
    paths = {}
    for alias, seed in (("t", 0), ("p", 1)):
        torch.manual_seed(seed)
        paths[alias] = save_checkpoint(tmp_path / f"{alias}.pt", create_model("resnet8", 10),
                                       arch="resnet8", num_classes=10, dataset="synthetic",
                                       metrics={})
    return str(build_cache(ds, paths, tmp_path / "cache", views=2, progress=False))


def test_two_cpu_ranks_stay_in_sync(tmp_path, tiny_cache):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(worker), str(tmp_path), tiny_cache],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 2 * 2  # 32 samples / 2 ranks / batch 8, 2 epochs
    assert r0["best"] == r1["best"]  # test accuracy all-reduced over the ranks' shares
    for k, p in r0["state"].items():  # parameters and BatchNorm buffers
        assert torch.equal(p, r1["state"][k]), k
    from ckd.models import create_model

    torch.manual_seed(0)  # the trainer's initialisation (seed 0): training moved it
    init = create_model("resnet8", 10).state_dict()
    assert not torch.equal(init["fc.weight"], r0["state"]["fc.weight"])
    recs = [json.loads(x) for x in Path(tmp_path, "run", "metrics.jsonl").read_text()
            .splitlines()]
    assert recs[0]["world_size"] == 2 and sorted(recs[0]["mentors"]) == ["p", "t"]
    assert sum(r["type"] == "step" for r in recs) == 4  # rank 0 logs alone


FEATURE_WORKER = textwrap.dedent("""
    import sys
    import torch
    from ckd.train import train

    out, teacher = sys.argv[1], sys.argv[2]
    res = train(dict(dataset="synthetic", dataset_options=dict(n_train=32, n_test=16),
                     student="resnet8", method="kd+0.8*crd", method_params={"nce_k": 16},
                     mentors_online=True, mentors=["t=" + teacher], epochs=2, batch_size=8,
                     device="cpu", progress=False, backend="reference", log_every=1,
                     out=out + "/run"))
    torch.save({"state": res["model"].state_dict(),
                "modules": res["method_modules"].state_dict()}, f"{out}/rank{res['rank']}.pt")
""")


@pytest.mark.slow  # two processes importing torch
def test_two_cpu_ranks_keep_crd_modules_in_sync(tmp_path):
    """CRD's embeddings (gradients averaged over ranks) and memories (every rank's batch
    gathered into the update) end identical on both ranks."""
    from ckd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "t.pt", create_model("resnet14", 10), arch="resnet14",
                              num_classes=10, dataset="synthetic", metrics={})
    worker = tmp_path / "worker.py"
    worker.write_text(FEATURE_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(worker), str(tmp_path), str(teacher)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for k, p in r0["state"].items():
        assert torch.equal(p, r1["state"][k]), k
    for k, p in r0["modules"].items():
        assert torch.equal(p, r1["modules"][k]), k
    # every sample's memory row was updated (re-normalised to unit length), those of the
    # other rank's samples too: the update gathers both ranks' batches
    for name in ("crd.memory_s", "crd.memory_t"):
        norms = r0["modules"][name].norm(dim=1)
        assert torch.allclose(norms, torch.ones(32), atol=1e-5), name

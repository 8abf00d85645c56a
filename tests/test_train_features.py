"""Feature methods in the trainer: modules built from the feature shapes, optimised with
the student, saved in the checkpoint and restored by --resume exactly; refused resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckd.train import train

DS = dict(n_train=32, n_test=16, num_classes=10, seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from ckd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    save_checkpoint(path, create_model("resnet14", 10), arch="resnet14", num_classes=10,
                    dataset="synthetic", metrics={})
    return str(path)


def _cfg(teacher: str, out: Path, method: str, **kw) -> dict:
    return {**dict(dataset="synthetic", dataset_options=DS, student="resnet8", method=method,
                   mentors_online=True, mentors=[f"t={teacher}"], batch_size=16, epochs=2,
                   device="cpu", progress=False, backend="reference", log_every=1, seed=3,
                   out=str(out)), **kw}


def _records(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "params", "stat"), [
    ("kd+0.8*crd", {"crd.nce_k": 32}, "crd_crd_s"),
    pytest.param("tekap+0.8*tekap-f", {"tekap-f.nce_k": 32}, "tekap-f_tekap_t_noisy",
                 marks=pytest.mark.slow),
    pytest.param("sdkd", {}, "sdkd_sdkd_proxy_ce", marks=pytest.mark.slow),
])
def test_feature_method_trains_and_resumes_exactly(teacher, tmp_path, method, params, stat):
    straight = train(_cfg(teacher, tmp_path / "straight", method, method_params=params))
    recs = _records(straight["run_dir"])
    run = recs[0]
    assert run["method_modules"]["params"] > 0 and run["method_modules"]["features"] == ["pool"]
    steps = [r for r in recs if r["type"] == "step"]
    assert all(stat in r for r in steps) and all(r["loss"] == r["loss"] for r in steps)
    ckpt = torch.load(Path(straight["run_dir"], "checkpoint.pt"), weights_only=False)
    assert ckpt["method_modules"]  # the modules' state is in the checkpoint
    # one epoch, then --resume for the second: same student and same module state
    half = _cfg(teacher, tmp_path / "resumed", method, method_params=params)
    train(dict(half, epochs=1))
    resumed = train(dict(half, resume=True, resume_allow=["epochs"]))
    for (k, a), b in zip(straight["model"].state_dict().items(),
                         resumed["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    a = torch.load(Path(straight["run_dir"], "checkpoint.pt"), weights_only=False)
    b = torch.load(Path(resumed["run_dir"], "checkpoint.pt"), weights_only=False)
    for k, v in a["method_modules"].items():
        assert torch.equal(v, b["method_modules"][k]), k


def test_crd_memory_is_reported_and_modules_learn(teacher, tmp_path):
    res = train(_cfg(teacher, tmp_path / "crd", "0.8*crd", method_params={"nce_k": 16},
                     epochs=1))
    run = _records(res["run_dir"])[0]
    assert run["method_modules"]["buffer_bytes"] >= 2 * 32 * 128 * 4  # two n_data x 128
    state = torch.load(Path(res["run_dir"], "checkpoint.pt"), weights_only=False)
    mods = state["method_modules"]
    # built from the shapes: student resnet8 pools 64 features, teacher resnet14 64
    assert mods["crd.embed_s.linear.weight"].shape == (128, 64)
    assert mods["crd.memory_s"].shape == (32, 128) and (mods["crd.z"] > 0).all()
    # the optimizer holds the modules' parameters (a second group)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2 and len(groups[1]["params"]) == 4  # two Linear weights + biases


def test_resume_refuses_a_checkpoint_without_the_modules(teacher, tmp_path):
    cfg = _cfg(teacher, tmp_path / "crd", "kd+crd", method_params={"nce_k": 8}, epochs=1)
    train(cfg)
    path = tmp_path / "crd" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["method_modules"]  # e.g. written by a ckd without feature methods
    torch.save(state, path)
    with pytest.raises(ValueError, match="holds no trainable modules for --method kd\\+crd"):
        train(dict(cfg, epochs=2, resume=True, resume_allow=["epochs"]))


def test_resume_refuses_the_modules_of_another_method(teacher, tmp_path):
    """Even with the method change allowed, a checkpoint holding fitnet's connector cannot
    be resumed as crd (its embeddings and memories are not there)."""
    cfg = _cfg(teacher, tmp_path / "fit", "kd+fitnet", epochs=1)
    train(cfg)
    with pytest.raises(ValueError, match=r"do not fit --method kd\+crd \(missing \['crd\."):
        train(dict(cfg, method="kd+crd", method_params={"nce_k": 8}, epochs=2, resume=True,
                   resume_allow=["epochs", "method", "method_params"]))

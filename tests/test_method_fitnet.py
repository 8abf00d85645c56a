"""fitnet: its reference against a direct computation, its module built from the feature
shapes, and a short training run through the registry (no other file names it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ckd.methods import get_method, make_plan
from ckd.methods.fitnet import fitnet


def test_fitnet_reference_is_the_hint_mse() -> None:
    torch.manual_seed(0)
    connector = torch.nn.Linear(8, 12)
    f_s, f_t = torch.randn(5, 8, requires_grad=True), torch.randn(5, 12)
    loss = fitnet(f_s, f_t, connector)
    want = ((f_s @ connector.weight.T + connector.bias - f_t) ** 2).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert f_s.grad.abs().sum() > 0 and connector.weight.grad.abs().sum() > 0


def test_fitnet_declaration_builds_from_shapes_and_sums() -> None:
    m = get_method("fitnet")
    assert not m.logit and m.inputs == ("pool",) and m.mentors == "teacher"
    plan = make_plan("kd+2*fitnet", backend="reference")
    student_shapes = ((16, 32, 32), (64,))
    mentor_shapes = [((32, 32, 32), (256,))]
    modules = plan.build_modules(student_shapes, mentor_shapes)
    assert modules["fitnet"].weight.shape == (256, 64)
    zs = torch.randn(4, 10, requires_grad=True)
    zm = torch.randn(1, 4, 10)
    y = torch.randint(0, 10, (4,))
    f_s, f_t = torch.randn(4, 64), torch.randn(4, 256)
    out = plan.loss(zs, zm, y, modules=modules, student_features=[f_s], mentor_pool=[f_t])
    kd = make_plan("kd", backend="reference").loss(zs, zm, y).loss
    hint = F.mse_loss(modules["fitnet"](f_s), f_t)
    torch.testing.assert_close(out.loss, kd + 2 * hint)
    assert "fitnet_hint" in out.stats


def test_fitnet_trains_with_online_teacher(tmp_path) -> None:
    from ckd.models import create_model, save_checkpoint
    from ckd.train import train

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.pt", create_model("resnet14", 10), arch="resnet14",
                    num_classes=10, dataset="synthetic", metrics={})
    res = train(dict(dataset="synthetic", dataset_options=dict(n_train=32, n_test=16),
                     student="resnet8", method="fitnet", mentors_online=True,
                     mentors=[f"t={tmp_path / 't.pt'}"], batch_size=16, epochs=1,
                     device="cpu", progress=False, backend="reference", log_every=1,
                     out=str(tmp_path / "run")))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["method_modules"]["fitnet.weight"].shape == (64, 64)
    assert res["steps"] == 2

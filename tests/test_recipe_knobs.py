"""The ImageNet recipe's knobs for supervised training (`ckd train-mentor`): label
smoothing (equal to torch's), the cosine schedule with linear warm-up, and weight decay
kept off biases and normalisation weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ckd.models import create_model
from ckd.train import load_config, make_schedule
from ckd.train.epoch import label_smoothing_term
from ckd.train.optim import make_optimizer, param_groups


def test_label_smoothing_is_torchs():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    got = F.cross_entropy(logits, labels) + label_smoothing_term(logits, labels, 0.1)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_label_smoothing_only_for_supervised_training():
    load_config(None, dataset="synthetic", method="nokd", label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match="--label-smoothing 0.1 applies to supervised"):
        load_config(None, dataset="synthetic", method="kd", label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match="--label-smoothing"):
        load_config(None, dataset="synthetic", method="nokd", label_smoothing=1.0).validate()


def test_cosine_with_warmup():
    s = make_schedule("cosine", base_lr=0.4, epochs=10, warmup_epochs=2)
    assert [round(s.lr_at(e), 6) for e in (0, 1)] == [round(0.4 / 3, 6), round(0.8 / 3, 6)]
    assert s.lr_at(2) == pytest.approx(0.4)
    assert s.lr_at(6) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert s.lr_at(9) < s.lr_at(8) < s.lr_at(3)
    assert make_schedule("cosine", base_lr=0.4, epochs=10).lr_at(0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="--warmup-epochs"):
        load_config(None, dataset="synthetic", schedule="cosine", epochs=3,
                    warmup_epochs=3).validate()


def test_weight_decay_exclusions():
    model = create_model("resnet8", 10)
    groups = param_groups(model, 5e-4, decay_norm_bias=False)
    decayed, free = groups[0]["params"], groups[1]["params"]
    assert all(p.ndim > 1 for p in decayed) and all(p.ndim <= 1 for p in free)
    assert len(decayed) + len(free) == len(list(model.parameters()))
    opt = make_optimizer("sgd", groups, 0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    # a BN weight with zero gradient is left alone; a conv kernel decays
    bn, conv = model.bn1.weight, model.conv1.weight
    before_bn, before_conv = bn.detach().clone(), conv.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(bn, before_bn) and not torch.equal(conv, before_conv)
    assert len(param_groups(model, 5e-4)) == 1  # the default: every parameter decays

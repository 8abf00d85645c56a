"""The method registry: declarations match their references, method sums, parameter
routing and ranges, presets, DKD's warm-up counting, the composition hook for methods
with their own modules, `ckd methods` and the README table generated from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ckd.cli.main import main as cli
from ckd.kernels import reference as R
from ckd.methods import (
    Method,
    MethodError,
    Param,
    all_methods,
    distill_loss,
    get_method,
    make_plan,
    parse_method,
    register,
)
from ckd.methods import registry as registry_mod
from ckd.methods.listing import markdown_table
from ckd.methods.registry import COUNTER_DEFAULTS


def inputs(B=8, C=10, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    return torch.randn(B, C, generator=g), 2 * torch.randn(M, B, C, generator=g), y


@pytest.mark.parametrize("name", list(all_methods()))
def test_declaration_matches_reference(name):
    m = get_method(name)
    if not m.logit:
        pytest.skip("not a logit method")
    sig = inspect.signature(m.reference).parameters
    takes = {k for k, p in sig.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert takes == {p.name for p in m.params} | set(m.counters)
    # the defaults live in the declaration only (hooks like rank_logits may default None)
    assert all(sig[p.name].default is inspect.Parameter.empty for p in m.params if p.cli)
    assert m.resolve() == m.defaults()  # every default lies in its own range
    for preset in m.presets:
        m.resolve(preset=preset)


def test_parse_method_sums_and_errors():
    assert parse_method("kd") == [(1.0, "kd")]
    assert parse_method(" 0.5*kd ") == [(0.5, "kd")]
    for bad, match in [("kdd", "unknown method 'kdd'; valid: nokd, kd"),
                       ("kd+", "cannot read term"), ("0*kd", "must be a number > 0"),
                       ("-1*kd", "cannot read term|must be a number > 0"),
                       ("kd+kd", "appears twice"), ("", "give a method name"),
                       ("kd+classroom", "both logit methods")]:
        with pytest.raises(MethodError, match=match):
            make_plan(bad)


@pytest.mark.parametrize("kw,match", [
    (dict(method="kd", params={"T": 0}), r"T=0 is invalid: must be a number > 0"),
    (dict(method="kd", params={"alpha_kd": -1}), "alpha_kd=-1 is invalid"),
    (dict(method="kd", shortcuts={"tau": -2.0}), r"T=-2.0 is invalid: must be a number > 0"),
    (dict(method="classroom", shortcuts={"beta": 0.0}), "beta=0.0 is invalid"),
    (dict(method="classroom", shortcuts={"variant": "authors"}),
     "must be one of paper, official"),
    (dict(method="classroom", params={"lam": 0}), "lam=0 is invalid"),
    (dict(method="dgkd", params={"p": 1.0}), r"must be a number >= 0 and < 1"),
    (dict(method="tekap", params={"n_copies": 2.5}), "n_copies=2.5 is invalid"),
    (dict(method="tekap", params={"lam_clean": 0, "lam_noisy": 0}),
     "nothing is distilled"),
    (dict(method="dkd", params={"warmup": 0}), "warmup=0 is invalid"),
    (dict(method="kd", params={"beta": 1.0}), "takes no parameter 'beta'"),
    (dict(method="kd", shortcuts={"beta": 1.0}), "--beta 1.0: method kd has no such"),
    (dict(method="kd", shortcuts={"variant": "official"}), "--variant official"),
    (dict(method="classroom", params={"rank_logits": 1}), "takes no parameter"),
    (dict(method="aver", preset="repdistiller"), "no term of --method aver has it"),
    (dict(method="kd", params={"T": "hot"}), "T='hot' is invalid"),
    (dict(method="kd", params={"T": True}), "T=True is invalid"),
])
def test_bad_parameters_name_value_and_range(kw, match):
    with pytest.raises(MethodError, match=match):
        make_plan(kw.pop("method"), **kw)


def test_kd_repdistiller_preset_and_precedence():
    zs, zm, y = inputs()
    plan = make_plan("kd", preset="repdistiller", backend="reference")
    assert plan.terms[0].params == {"T": 4.0, "alpha_ce": 0.1, "alpha_kd": 0.9}
    expect = R.kd(zs, zm, y, T=4.0, alpha_ce=0.1, alpha_kd=0.9)[0]
    torch.testing.assert_close(plan.loss(zs, zm, y).loss, expect)
    # an explicit parameter beats the preset; --param beats the --tau shortcut
    plan = make_plan("kd", {"alpha_kd": 0.5, "T": 2.0}, "repdistiller", {"tau": 3.0})
    assert plan.terms[0].params == {"T": 2.0, "alpha_ce": 0.1, "alpha_kd": 0.5}


def test_dkd_warmup_counts_epochs_from_one():
    """mdistiller's trainer starts at epoch 1: min(epoch / warmup, 1) is 1/20 in the first
    epoch, not 0. The trainer passes its 0-based epoch index to LossPlan.loss."""
    zs, zm, y = inputs()
    plan = make_plan("dkd", backend="reference")
    first = plan.loss(zs, zm, y, epoch=0).loss
    ce_only = torch.nn.functional.cross_entropy(zs, y)
    assert float(first) > float(ce_only) + 1e-4  # the DKD term is already on
    for index in (0, 9, 19, 30):
        got = plan.loss(zs, zm, y, epoch=index).loss
        expect = R.dkd(zs, zm, y, T=4.0, alpha_ce=1.0, dkd_alpha=1.0, dkd_beta=8.0,
                       warmup=20, epoch=index + 1)[0]
        torch.testing.assert_close(got, expect)
    past = R.dkd(zs, zm, y, T=4.0, alpha_ce=1.0, dkd_alpha=1.0, dkd_beta=8.0, warmup=20,
                 epoch=None)[0]
    torch.testing.assert_close(plan.loss(zs, zm, y, epoch=19).loss, past)  # 20/20 = 1


@pytest.fixture
def toy_feature_method():
    """A non-logit method owning a trainable module, registered only for this test."""

    def build(student_shapes, mentor_shapes, params):
        return nn.Linear(student_shapes, mentor_shapes, bias=False)

    def loss(inputs, module, *, scale, step):
        hint = module(inputs.student_logits)
        value = scale * (hint - inputs.mentor_logits[0]).pow(2).mean()
        return value, {"hint": value.detach(), "step": torch.tensor(float(step))}

    toy = register(Method("toyhint", "test-only hint", mentors="teacher", logit=False,
                          inputs=("logits",), loss=loss, build_modules=build,
                          counters=("step",),
                          params=(Param("scale", 2.0, float, "loss scale", low=0.0),)))
    yield toy
    del registry_mod._REGISTRY["toyhint"]


def test_sum_with_a_method_that_owns_modules(toy_feature_method):
    zs, zm, y = inputs()
    zs.requires_grad_()
    plan = make_plan("kd+0.5*toyhint", {"toyhint.scale": 3.0}, backend="reference")
    assert [(t.method.name, t.weight) for t in plan.terms] == [("kd", 1.0), ("toyhint", 0.5)]
    modules = plan.build_modules(10, 10)
    assert list(modules) == ["toyhint"]
    out = plan.loss(zs, zm, y, step=7, modules=modules)
    kd = distill_loss(zs, zm, y, method="kd", backend="reference").loss
    hint = 3.0 * (modules["toyhint"](zs) - zm[0]).pow(2).mean()
    torch.testing.assert_close(out.loss, kd + 0.5 * hint)
    assert float(out.stats["toyhint_step"]) == 7.0
    out.loss.backward()  # gradients reach the student and the method's module
    assert zs.grad is not None and modules["toyhint"].weight.grad is not None
    # no logit term: nokd supplies the CE term
    alone = make_plan("toyhint", backend="reference")
    assert [t.method.name for t in alone.terms] == ["nokd", "toyhint"]
    with pytest.raises(MethodError, match="write METHOD.T|takes no parameter 'nope'"):
        make_plan("kd+toyhint", {"nope": 1})


def test_register_refuses_a_second_declaration():
    with pytest.raises(ValueError, match="registered twice"):
        register(Method("kd", "again", mentors="teacher", reference=R.kd))
    with pytest.raises(ValueError, match="either a logit method"):
        Method("x", "neither", mentors="none", logit=False)


def test_methods_command_lists_registry():
    res = CliRunner().invoke(cli, ["methods"])
    assert res.exit_code == 0, res.output
    for m in all_methods().values():
        assert f"{m.name}: {m.summary}" in res.output
        for p in m.params:
            assert (f"    {p.name}" in res.output) == p.cli
    assert "preset repdistiller (--preset repdistiller): alpha_ce=0.1, alpha_kd=0.9" \
        in res.output
    res = CliRunner().invoke(cli, ["methods", "nope"])
    assert res.exit_code == 1 and "unknown method 'nope'" in res.output
    assert "Traceback" not in res.output


def test_readme_methods_table_is_the_registry():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate: python -c 'from ckd.methods.listing " \
        "import markdown_table; print(markdown_table())'"


def test_counters_are_the_declared_set():
    assert set(COUNTER_DEFAULTS) == {"seed", "step", "epoch"}
    for m in all_methods().values():
        assert set(m.counters) <= set(COUNTER_DEFAULTS)

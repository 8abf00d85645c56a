"""Options declared once: every field of `TrainConfig` and `CacheConfig` is declared with
`ckd.options.option`, and `ckd train` / `ckd cache-logits` carry exactly one option
generated from each declaration, with its default and choices; a value out of range is
refused on the command line with the message a config file's value gets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ckd.cache.config import CacheConfig
from ckd.cli.cache import cache_logits
from ckd.cli.main import main as cli
from ckd.cli.params import Declared, field_help
from ckd.cli.train import train, train_mentor
from ckd.options import OptionError, declared_fields, default_device, field_flag, flag
from ckd.train.config import TrainConfig

COMMANDS = [(TrainConfig, train), (CacheConfig, cache_logits)]


def options_named(command: click.Command, name: str) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name == name]


def declared_type(opt: click.Option) -> Declared | None:
    """The option's Declared type (a float's is wrapped by the CLI-wide finite rule)."""
    kind = getattr(opt.type, "inner", opt.type)
    return kind if isinstance(kind, Declared) else None


@pytest.mark.parametrize(("config", "command"), COMMANDS, ids=["train", "cache-logits"])
def test_every_field_is_declared_and_has_exactly_one_generated_option(config, command):
    fields = dataclasses.fields(config)
    assert [f.name for f in declared_fields(config)] == [f.name for f in fields]
    for f in fields:
        param = f.metadata["option"]
        found = options_named(command, f.name)
        assert len(found) == 1, f"{f.name}: {[o.opts for o in found]}"
        opt = found[0]
        spellings = opt.opts + opt.secondary_opts
        assert flag(f.name) in spellings or f.metadata["flags"], (f.name, spellings)
        # unset, the option leaves a config file's value (or the declared default) alone
        assert opt.default in (None, ()), (f.name, opt.default)
        assert opt.help == field_help(f)
        if param.type is bool:
            assert opt.is_flag and opt.secondary_opts, f.name
        if param.default not in (None, {}, []) and param.type is not bool:
            assert f"default: {param.default}" in opt.help, f.name
        if param.type in (int, float, str) and f.name not in ("method", "views"):
            assert declared_type(opt).param is param, f.name  # checked by its declaration
        if param.choices:  # the declared choices, and nothing else, listed in --help
            assert declared_type(opt).get_metavar(opt) == "[" + "|".join(param.choices) + "]"


def test_train_mentor_options_are_train_options():
    """train-mentor's options are the same generated options (minus the distillation
    ones), not a second declaration; --mentor-dir there is the folder it writes to."""
    for opt in train_mentor.params:
        if opt.name in {f.name for f in dataclasses.fields(TrainConfig)} - {"mentor_dir"}:
            twin = options_named(train, opt.name)[0]
            assert (opt.opts, opt.help, opt.secondary_opts) == \
                (twin.opts, twin.help, twin.secondary_opts)


def out_of_range(param) -> list:
    if param.choices:
        return ["not-a-choice"]
    bad = []
    if param.low is not None:
        bad.append(param.low if param.low_open else param.low - 1)
    if param.high is not None:
        bad.append(param.high if param.high_open else param.high + 1)
    return [param.type(b) for b in bad]


CASES = [(config, command, f, value) for config, command in COMMANDS
         for f in declared_fields(config) for value in out_of_range(f.metadata["option"])
         if declared_type(options_named(command, f.name)[0])]


@pytest.mark.parametrize(("config", "command", "field", "value"), CASES,
                         ids=[f"{c.__name__}.{f.name}={v}" for c, _, f, v in CASES])
def test_a_value_out_of_range_is_refused_with_the_fields_message(config, command, field,
                                                                  value):
    """The command line refuses it as it is parsed, with the same message as a config's
    value (TrainConfig.validate for a --config file, CacheConfig.validate for build_cache's
    keywords)."""
    with pytest.raises(OptionError) as from_config:
        config(**{field.name: value}).validate()
    message = str(from_config.value)
    assert message.startswith(f"{field_flag(field)}={value!r} is invalid: must be ")
    assert field.metadata["option"].help in message
    with pytest.raises(click.BadParameter) as from_cli:
        command.make_context(command.name, [field_flag(field), str(value)],
                             resilient_parsing=False)
    assert from_cli.value.message == message


def test_values_from_the_command_line_and_a_config_file(tmp_path, monkeypatch):
    """--config keeps working: the file's values under the flags actually given."""
    seen = {}
    monkeypatch.setattr("ckd.train.train", lambda cfg: seen.setdefault("cfg", cfg) and {
        "best_acc": 0.0, "last_acc": 0.0, "run_dir": str(tmp_path)})
    exp = tmp_path / "exp.yaml"
    exp.write_text("epochs: 7\ncache_mode: stream\nbatch_size: 16\nmilestones: 2,5\n"
                   "dataset_options: {n_train: 32}\n")
    res = CliRunner().invoke(cli, ["train", "--config", str(exp), "--batch-size", "8",
                                   "--no-amp", "-D", "n_test=4", "--param", "T=2"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.cache_mode, cfg.batch_size, cfg.amp) == (7, "stream", 8, False)
    assert cfg.milestones == [2, 5] and cfg.method_params == {"T": 2}
    assert cfg.dataset_options == {"n_test": 4}  # a flag replaces the file's mapping
    assert cfg.seed == TrainConfig().seed and cfg.progress is True  # declared defaults


def test_a_config_files_bad_mapping_is_named_by_its_flag():
    with pytest.raises(OptionError, match=r"^--dataset-opt=3 is invalid: must be a mapping"):
        TrainConfig(dataset_options=3).validate()


def test_build_cache_options_are_the_commands():
    """build_cache takes a CacheConfig or its fields as keywords; device None is
    `default_device()`, the CLI's default too."""
    assert CacheConfig().resolved_device == default_device()
    cfg = CacheConfig(views=3, features=["pool"], logits={"a": "topk:2"}).validate()
    assert (cfg.views, cfg.features, cfg.logits) == ("3", "pool", "a=topk:2")
    with pytest.raises(OptionError, match=r"--resolution r50='x' is invalid"):
        CacheConfig(resolutions={"r50": "x"}).validate()
    with pytest.raises(TypeError, match=r"unknown cache option\(s\) \['view'\]; valid: views"):
        CacheConfig().replace(view=3)


def test_cuda_if_available_is_decided_in_one_place():
    root = Path(__file__).resolve().parents[1] / "ckd"
    rule = re.compile(r"cuda.*if .*cuda\.is_available\(\)")
    places = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                    if rule.search(p.read_text()))
    assert places == ["options.py"], places

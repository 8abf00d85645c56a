"""Click parameter types and callbacks that apply `ckd.options` checks at parse time, so a
bad value is refused (exit code 2, option named) before any work starts; and
`config_options`, which generates a command's options from a config dataclass's
declarations (`ckd.options.option`), so a choice list or a default is written once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
import yaml

from ckd.options import (
    OptionError,
    Param,
    check_device,
    check_writable_dir,
    declared_fields,
    field_flag,
    flag,
)


def device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--device: cpu, cuda or cuda:N, and only a GPU that is present."""
    try:
        check_device(value, f"--{param.name}")
    except OptionError as err:
        raise click.BadParameter(str(err), ctx, param) from None
    return value


def writable_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An output folder that exists or can be created, and can be written."""
    try:
        check_writable_dir(value, "--" + param.name.replace("_", "-"))
    except OptionError as err:
        raise click.BadParameter(str(err), ctx, param) from None
    return value


class Views(click.ParamType):
    """--views: `all` (every distinct view of the recipe) or K >= 1 keyed views per sample
    (K's upper bound depends on the data: `ckd.cache.writer.check_views`)."""

    name = "views"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if value == "all":
            return value
        try:
            k = int(value)
        except (TypeError, ValueError):
            k = 0
        if k < 1:
            self.fail(f"{value!r} is invalid: must be 'all' or a number of views K >= 1",
                      param, ctx)
        return str(k)


class Finite(click.ParamType):
    """A float option refused when NaN or +-inf (`finite_floats` wraps every float option
    of every command in it): such a value reaching a loss or an optimizer only produces
    NaN weights. An option where inf means something declares `allows_non_finite = True`
    on its type and is left alone."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = inner.name

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None):
        return self.inner.get_metavar(param, ctx)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        value = self.inner.convert(value, param, ctx)
        if value is not None and not math.isfinite(value):
            self.fail(f"{value} is invalid: must be a finite number (not NaN or inf)", param,
                      ctx)
        return value


def finite_floats(command: click.Command) -> None:
    """Every float option of `command` (and of its subcommands) refuses NaN and inf: one
    rule for the whole CLI, applied where the commands are registered."""
    for param in command.params:
        kind = param.type
        if isinstance(kind, click.types.FloatParamType) and \
                not getattr(kind, "allows_non_finite", False):
            param.type = Finite(kind)
    for sub in getattr(command, "commands", {}).values():
        finite_floats(sub)


# ------------------------------------------------------------ options from declarations
class Declared(click.ParamType):
    """A declared field's value, parsed and checked by its `Param` as it is parsed: a value
    out of range is refused with the same message a config file's value gets."""

    def __init__(self, param: Param, label: str) -> None:
        self.param, self.label = param, label
        self.name = "choice" if param.choices else {int: "integer", float: "float"}.get(
            param.type, "text")

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        if self.param.choices:
            return "[" + "|".join(str(c) for c in self.param.choices) + "]"
        return self.name.upper()

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str):
        from click.shell_completion import CompletionItem  # noqa: PLC0415 - completion only

        return [CompletionItem(str(c)) for c in self.param.choices
                if str(c).startswith(incomplete)]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, str) and self.param.type in (int, float):
            try:
                value = self.param.type(value)
            except ValueError:
                pass  # left a string: the check below names the option and the range
        try:
            return self.param.check(value, label=self.label)
        except OptionError as err:  # `ckd --debug` re-raises the OptionError itself
            raise click.BadParameter(str(err), ctx, param) from err


class DeclaredFloat(Declared, click.types.FloatParamType):
    """A declared float (a FloatParamType, so `finite_floats` covers it too)."""


def field_help(f: dataclasses.Field) -> str:
    """A field's `--help` text: its help, its details, then its default and range."""
    p: Param = f.metadata["option"]
    words = p.help.split()
    plain = len(words) > 1 and words[0].replace("-", "").isalpha() and words[1] != "|"
    text = (p.help[:1].upper() + p.help[1:] if plain else p.help) + "."
    if f.metadata.get("details"):
        text += " " + f.metadata["details"]
    facts = []
    if p.type is bool:
        on, off = _bool_flags(f).split("/")
        facts.append(f"default: {on if p.default else off}")
    elif p.default not in (None, {}, []):
        facts.append(f"default: {p.default}")
    if not p.choices and (p.low is not None or p.high is not None):
        facts.append(p.range_text().removesuffix(" (or null)"))
    return text + (f"  [{'; '.join(facts)}]" if facts else "")


def _bool_flags(f: dataclasses.Field) -> str:
    """A bool field's `--on/--off` pair (declared, else `--name/--no-name`)."""
    declared = [s for s in f.metadata.get("flags") or () if "/" in s]
    return declared[0] if declared else f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"


def field_option(f: dataclasses.Field, **extra: Any) -> Callable:
    """One click option for one declared field. It defaults to None, so an option not given
    leaves the config file's value (or the declared default) alone; `extra`: click keywords
    a command adds (a richer type, a callback, an option class)."""
    p: Param = f.metadata["option"]
    names = list(f.metadata.get("flags") or ())
    kw: dict[str, Any] = dict(default=None, help=field_help(f))
    if p.type is bool:
        names = names or [_bool_flags(f)]
    elif p.type is dict:  # KEY=VALUE, repeatable (config_values makes the mapping)
        kw.update(multiple=True, default=(), metavar=f.metadata.get("metavar") or "KEY=VALUE")
    elif p.type is list:  # a comma list, split by the config loader
        kw.update(metavar=f.metadata.get("metavar") or "A,B,...")
    else:
        kind = DeclaredFloat if p.type is float else Declared
        kw.update(type=kind(p, field_flag(f)))
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
    kw.update(extra)
    return click.option(*(names or [flag(f.name)]), f.name, **kw)


def config_options(config: type, *, only: Iterable[str] | None = None,
                   exclude: Iterable[str] = (),
                   extra: Mapping[str, Mapping[str, Any]] | None = None) -> Callable:
    """A decorator adding one generated option per declared field of the dataclass `config`
    (in declaration order; `only`/`exclude` pick fields by name; `extra[name]`: click
    keywords for that field's option)."""
    chosen = [f for f in declared_fields(config)
              if (only is None or f.name in only) and f.name not in set(exclude)]
    if only is not None and {f.name for f in chosen} != set(only) - set(exclude):
        raise ValueError(f"{config.__name__} declares no field(s) "
                         f"{sorted(set(only) - {f.name for f in chosen})}")

    def decorate(command: Callable) -> Callable:
        for f in reversed(chosen):
            command = field_option(f, **(extra or {}).get(f.name, {}))(command)
        return command

    return decorate


def config_values(config: type, kw: dict[str, Any]) -> dict[str, Any]:
    """The generated options' values as config keys: KEY=VALUE pairs of a mapping field
    become a dict (values read as YAML: 3 is an int, .nan a float); None (and an empty
    mapping) means not given."""
    values = dict(kw)
    for f in declared_fields(config):
        if f.metadata["option"].type is dict and f.name in values:
            values[f.name] = key_values(values[f.name], (field_flag(f),))
    return values


def key_values(pairs: Iterable[str], flags: tuple[str, ...]) -> dict[str, Any] | None:
    pairs = tuple(pairs or ())
    if not pairs:
        return None
    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{p!r}: expected KEY=VALUE", param_hint=flags[-1])
        out[key.strip()] = yaml.safe_load(val)
    return out

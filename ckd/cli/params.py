"""Click parameter types and callbacks that apply `ckd.options` checks at parse time, so a
bad value is refused (exit code 2, option named) before any work starts."""

from __future__ import annotations

import math
from typing import Any

import click

from ckd.options import OptionError, check_device, check_writable_dir


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

"""Click parameter types and callbacks that apply `ckd.options` checks at parse time, so a
bad value is refused (exit code 2, option named) before any work starts."""

from __future__ import annotations

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

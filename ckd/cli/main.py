"""The `ckd` command: a click group; each stage adds its commands from its own module.

Errors: a command's failure reaches the user as one line naming the problem and the fix
(`Error: ...`, exit code 1; click's own usage errors exit 2). `ckd --debug COMMAND` shows
the full traceback instead.

Imports: the command modules (ckd/cli/*.py) import the stages they run inside their
command functions, on use, so that `ckd --help` and a command's `--help` stay fast (no
torch, zarr or model zoo loaded to print usage). That is the one reason for the imports
inside functions under ckd/cli/; elsewhere ckd imports its own modules at the top.
"""

import importlib

import click

from ckd.cli.errors import error_line
from ckd.cli.params import finite_floats

# Modules that define a module-level `commands` list of click commands/groups.
STAGE_MODULES = ("data", "models", "methods", "cache", "train", "aid", "demo", "pose")


class CkdGroup(click.Group):
    """One error policy for every command (ckd.cli.errors): a failure is one line naming
    the problem and the fix; `--debug` re-raises the underlying exception with its
    traceback."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.ClickException as err:  # commands wrap their errors `from err`
            if debug and err.__cause__ is not None:
                raise err.__cause__ from None
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            line = None if debug else error_line(err, ctx.invoked_subcommand)
            if line is None:
                raise
            raise click.ClickException(line) from err


@click.group(cls=CkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="ckd")
def main(debug: bool) -> None:
    """ckd: multi-mentor knowledge distillation from an offline logit cache."""


for _name in STAGE_MODULES:
    try:
        _mod = importlib.import_module(f"ckd.cli.{_name}")
    except ModuleNotFoundError as err:  # a stage not written yet
        if err.name != f"ckd.cli.{_name}":
            raise
        continue
    for _cmd in _mod.commands:
        finite_floats(_cmd)  # NaN or inf never reaches a loss or an optimizer
        main.add_command(_cmd)


if __name__ == "__main__":
    main()

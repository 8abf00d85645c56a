"""The `ckd` command: a click group; each stage adds its commands from its own module."""

import importlib

import click

# Modules that define a module-level `commands` list of click commands/groups.
STAGE_MODULES = ("data", "models", "cache", "train", "demo")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckd")
def main() -> None:
    """ckd: multi-mentor knowledge distillation from an offline logit cache."""


for _name in STAGE_MODULES:
    try:
        _mod = importlib.import_module(f"ckd.cli.{_name}")
    except ModuleNotFoundError as err:  # a stage not written yet
        if err.name != f"ckd.cli.{_name}":
            raise
        continue
    for _cmd in _mod.commands:
        main.add_command(_cmd)


if __name__ == "__main__":
    main()

"""`ckd methods`: the registered distillation methods (thin wrapper over ckd.methods)."""

from __future__ import annotations

import click


@click.command("methods")
@click.argument("names", nargs=-1)
def methods(names: tuple[str, ...]) -> None:
    """List methods: paper, what they read from the mentors, parameters with defaults and
    valid ranges, presets. Give NAMES to show only those."""
    from ckd.methods import all_methods, get_method  # noqa: PLC0415
    from ckd.methods.listing import describe  # noqa: PLC0415

    chosen = [get_method(n) for n in names] if names else list(all_methods().values())
    click.echo("\n\n".join(describe(m) for m in chosen))
    if not names:
        click.echo("\nCombine a logit method with others as a weighted sum: "
                   "--method kd+0.5*OTHER (at most one logit method per sum).")


commands = [methods]

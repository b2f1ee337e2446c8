"""``mlx-intent config``: the effective settings, where each came from, and the chain they run."""

from __future__ import annotations

import click

from mlx_intent.cli.options import chain_in_force, settings_options
from mlx_intent.settings import ENV_VARS, Settings


@click.command("config")
@settings_options
def config_command(settings: Settings) -> None:
    """Show the effective settings and where each came from: default, .env, environment or command line."""
    rows = [("setting", "variable", "value", "source")]
    rows += [(name, ENV_VARS[name], value, source) for name, value, source in settings.as_rows()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
    for line in chain_in_force(settings):
        click.echo(line)

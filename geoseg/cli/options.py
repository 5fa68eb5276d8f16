"""Options shared by several commands."""

from __future__ import annotations

import click

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config key, e.g. --set tile.size=256 (repeatable).",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
config_argument = click.argument("config", type=click.Path(dir_okay=True, path_type=str))

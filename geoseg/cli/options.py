"""Options shared by several commands."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config key, e.g. --set tile.size=256 (repeatable).",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
config_argument = click.argument("config", type=click.Path(dir_okay=True, path_type=str))

STATE = {"verbose": False}


def set_verbosity(verbose: bool, quiet: bool, reset: bool = False) -> None:
    """Log level of geoseg's messages; lines carry a timestamp when stderr is not a terminal (logs, cron).

    ``reset`` (the command group, once per invocation) starts from the defaults; a command's own ``-v``/``-q``
    then only raise or lower it.
    """
    if reset:
        STATE["verbose"] = verbose
    elif verbose:
        STATE["verbose"] = True
    level = logging.DEBUG if STATE["verbose"] else logging.WARNING if quiet else logging.INFO
    fmt = "%(message)s" if sys.stderr.isatty() else "%(asctime)s %(message)s"
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.WARNING)
    for existing in root.handlers:
        existing.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S%z"))
    logger = logging.getLogger("geoseg")
    if reset or verbose or quiet:
        logger.setLevel(level)


def verbosity(command: Callable[..., Any]) -> Callable[..., Any]:
    """``-v``/``-q`` on a command too, so they work anywhere on the line (``geoseg run x.tif -q``)."""

    def apply(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            set_verbosity(param.name == "verbose", param.name == "quiet")
        return value

    command = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=apply,
                           help="Only warnings and errors.")(command)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=apply,
                        help="Debug logging; tracebacks on errors.")(command)

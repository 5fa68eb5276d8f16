"""``geoseg`` entry point: the command group and the one-line error policy.

User errors (:class:`~geoseg.errors.GeosegError`) print ``geoseg: error: <message>`` on one line and exit
1; ``--verbose`` adds the traceback. Commands live in their own modules and only parse options.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from geoseg._version import __version__
from geoseg.errors import GeosegError

_STATE = {"verbose": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="geoseg")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: bool, quiet: bool) -> None:
    """Land-cover segmentation of large georeferenced rasters, tiled and distributed with Dask."""
    _STATE["verbose"] = verbose
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("geoseg").setLevel(level)


def _register() -> None:
    from geoseg.cli import batch, evaluate, export, run, sample, train, vectorize

    for module in (run, batch, train, evaluate, vectorize, export, sample):
        cli.add_command(module.command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising."""
    from geoseg import interrupt

    try:
        with interrupt.handled():
            code = cli.main(args=argv, prog_name="geoseg", standalone_mode=False)
        return code if isinstance(code, int) else 0  # click returns the code of an Exit raised by a command
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        args = sys.argv[1:] if argv is None else argv
        hint = ("rerun it with --resume to continue from the last finished epoch" if "train" in args else
                "rerun the same command to continue from the finished chunks")
        click.echo(f"geoseg: interrupted; {hint}", err=True)
        return 130
    except GeosegError as exc:
        if _STATE["verbose"]:
            traceback.print_exc()
        click.echo(f"geoseg: error: {_one_line(str(exc))}", err=True)
        return 1
    except OSError as exc:  # disk full, permissions, a file gone: the machine's state, not a bug in geoseg
        if _STATE["verbose"]:
            traceback.print_exc()
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        what = exc.strerror or str(exc) or type(exc).__name__
        click.echo(f"geoseg: error: {where}{_one_line(what)}; nothing was left half-written", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - anything else is a bug; still one line unless --verbose
        if _STATE["verbose"]:
            traceback.print_exc()
        click.echo(
            f"geoseg: internal error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --verbose for details)",
            err=True,
        )
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())

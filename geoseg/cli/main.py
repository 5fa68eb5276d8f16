"""``geoseg`` entry point: the command group and the one-line error policy.

User errors (:class:`~geoseg.errors.GeosegError`) print ``geoseg: error: <message>`` on one line and exit
1; a usage error exits 2, a bug (any other exception) ``geoseg: internal error: ...`` and 4; ``--verbose``
adds the traceback. Commands live in their own modules and only parse options.
"""

from __future__ import annotations

import sys
import traceback

import click

from geoseg._version import __version__
from geoseg.cli.options import STATE as _STATE
from geoseg.cli.options import set_verbosity
from geoseg.errors import EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED, GeosegError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="geoseg")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: bool, quiet: bool) -> None:
    r"""Land-cover segmentation of large georeferenced rasters, tiled and distributed with Dask.

    \b
    geoseg run scene.tif --model model.safetensors -o out/     segment a scene
    geoseg run pipelines/landcover.yaml                        ... or as a pipeline YAML describes it

    \b
    Exit codes: 0 done; 1 an error in the configuration, an input, an output folder or the cluster (one
    line says which); 2 a usage error; 3 geoseg batch ran and some scenes failed; 4 an internal error (a
    bug: please report it with --verbose's output); 130 stopped by SIGINT/SIGTERM (rerun to continue).
    """
    set_verbosity(verbose, quiet, reset=True)


def _register() -> None:
    from geoseg.cli import batch, evaluate, export, pretrain, run, sample, train, vectorize, worker

    for module in (run, batch, train, pretrain, evaluate, vectorize, export, sample, worker):
        cli.add_command(module.command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of raising."""
    from geoseg import interrupt

    _STATE["verbose"] = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
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
        return _exit_soon(EXIT_INTERRUPTED)
    except GeosegError as exc:
        if _STATE["verbose"]:
            traceback.print_exc()
        click.echo(f"geoseg: error: {_one_line(str(exc))}", err=True)
        return _exit_soon(EXIT_ERROR) if interrupt.requested() else EXIT_ERROR
    except OSError as exc:  # disk full, permissions, a file gone: the machine's state, not a bug in geoseg
        if _STATE["verbose"]:
            traceback.print_exc()
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        what = exc.strerror or str(exc) or type(exc).__name__
        click.echo(f"geoseg: error: {where}{_one_line(what)}; nothing was left half-written", err=True)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - anything else is a bug; still one line unless --verbose
        if _STATE["verbose"]:
            traceback.print_exc()
        click.echo(
            f"geoseg: internal error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --verbose for details)",
            err=True,
        )
        return EXIT_INTERNAL


def _exit_soon(code: int, grace_s: float = 10.0) -> int:
    """``code``, once the threads a stopped run leaves behind are done; after ``grace_s`` the process ends anyway.

    A stop request must end the process (SLURM sends SIGKILL after its KillWait): a thread still blocked in
    a library call would otherwise keep it alive at exit, as concurrent.futures joins its workers then.
    """
    import atexit
    import os
    import threading
    import time

    # The run's clusters were closed on the way out (quietly, within a bound); distributed's own atexit
    # hook would try a cluster whose close timed out once more and print its traceback.
    spec = sys.modules.get("distributed.deploy.spec")
    if spec is not None and hasattr(spec, "close_clusters"):
        atexit.unregister(spec.close_clusters)
    deadline = time.monotonic() + grace_s
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
    return code


def _one_line(text: str) -> str:
    return " ".join(text.split())

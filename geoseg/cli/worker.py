"""``geoseg worker SCHEDULER_ADDRESS``: Dask workers set up for geoseg (allocator, GDAL, GPUs, model code)."""

from __future__ import annotations

import click

from geoseg.cli.options import verbosity


@click.command("worker")
@click.argument("address")
@click.option("--nthreads", type=int, default=None, help="Task threads of the CPU worker [default: the CPUs].")
@click.option("--infer", "infer", type=int, default=2, show_default=True,
              help="Inference tasks the CPU worker runs at once (they share its cores).")
@click.option("--gpus", type=int, default=None, help="Workers with one GPU each [default: every GPU torch sees; "
              "0 for a CPU worker].")
@click.option("--name", default=None, help="Worker name [default: geoseg-HOSTNAME].")
@click.option("--memory-limit", default="auto", show_default=True, help="Memory limit per worker, e.g. 16GiB.")
@click.option("--local-directory", default=None, help="Scratch folder of the workers, e.g. $TMPDIR.")
@verbosity
def command(address: str, nthreads: int | None, infer: int, gpus: int | None, name: str | None, memory_limit: str,
            local_directory: str | None) -> None:
    """Join the Dask scheduler at ADDRESS with workers prepared for geoseg (one per GPU, or one CPU worker).

    The process restarts itself once with geoseg's allocator and GDAL settings (MALLOC_ARENA_MAX, ...);
    SIGINT/SIGTERM stop the workers.
    """
    import socket

    from geoseg.config.pipeline import parse_scheduler_address
    from geoseg.errors import ConfigError
    from geoseg.worker import reexec_prepared, serve, worker_specs

    try:
        address = parse_scheduler_address(address)
    except ValueError as exc:
        raise ConfigError(f"ADDRESS {address!r}: {exc}") from None
    reexec_prepared()
    specs = worker_specs(name or f"geoseg-{socket.gethostname()}", nthreads, infer, gpus)
    code = serve(address, specs, memory_limit=memory_limit, local_directory=local_directory)
    if code:
        raise click.exceptions.Exit(code)

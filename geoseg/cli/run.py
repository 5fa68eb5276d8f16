"""``geoseg run PIPELINE.yaml``: one scene through every stage."""

from __future__ import annotations

import click

from geoseg.cli.options import config_argument, overwrite_option, set_option


@click.command("run")
@config_argument
@set_option
@overwrite_option
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def command(config: str, overrides: tuple[str, ...], overwrite: bool, progress: bool | None) -> None:
    """Segment the pipeline's input raster into a land-cover GeoTIFF (and its companions)."""
    from geoseg.pipeline import load_pipeline, run_pipeline

    if overwrite:
        overrides = (*overrides, "overwrite=true")
    cfg = load_pipeline(config, overrides)
    result = run_pipeline(cfg, progress=progress)
    t = result.timings
    click.echo(f"wrote {result.landcover} ({sum(t.values()):.1f}s: "
               + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + ")", err=True)
    click.echo(f"manifest {result.manifest}", err=True)

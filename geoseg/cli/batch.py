"""``geoseg batch PIPELINE.yaml --scenes SPEC``: many scenes, one output folder each, one bad scene sinks none."""

from __future__ import annotations

import click

from geoseg.cli.options import config_argument, overwrite_option, set_option


@click.command("batch")
@config_argument
@click.option("--scenes", "scenes_spec", required=True, help="Glob (quoted) or text file with one raster path per line.")
@set_option
@overwrite_option
def command(config: str, scenes_spec: str, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Run the pipeline on every scene; write batch.json and batch.csv; exit 1 if any scene failed."""
    from geoseg.batch import expand_scenes, run_batch
    from geoseg.pipeline import load_pipeline

    if overwrite:
        overrides = (*overrides, "overwrite=true")
    cfg = load_pipeline(config, overrides)
    report = run_batch(cfg, expand_scenes(scenes_spec))
    counts = report.counts()
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; manifest {report.path}", err=True)
    if counts.get("failed"):
        raise click.exceptions.Exit(1)

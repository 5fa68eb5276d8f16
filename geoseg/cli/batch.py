"""``geoseg batch PIPELINE.yaml --scenes SPEC``: many scenes, one output folder each, one bad scene sinks none."""

from __future__ import annotations

import click

from geoseg.cli.options import config_argument, overwrite_option, set_option


@click.command("batch")
@config_argument
@click.option("--scenes", "scenes_spec", required=True,
              help="Glob (quoted), text file with one raster path per line, or STAC ItemCollection JSON.")
@set_option
@overwrite_option
@click.option("--force", is_flag=True, help="Redo every scene, also those finished with the same inputs and config.")
def command(config: str, scenes_spec: str, overrides: tuple[str, ...], overwrite: bool, force: bool) -> None:
    """Run the pipeline on every scene into OUTPUT_DIR/<scene>/; skip finished scenes; write batch.json/.csv.

    Exit 0 only when every scene is done or skipped.
    """
    from geoseg.batch import expand_scenes, run_batch
    from geoseg.pipeline import load_pipeline

    if overwrite:
        overrides = (*overrides, "overwrite=true")
    cfg = load_pipeline(config, overrides)
    report = run_batch(cfg, expand_scenes(scenes_spec, cfg.batch.stac_asset), force=force)
    counts = report.counts()
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; manifest {report.path}", err=True)
    if not report.ok:
        raise click.exceptions.Exit(1)

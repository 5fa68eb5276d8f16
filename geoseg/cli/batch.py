"""``geoseg batch PIPELINE.yaml --scenes SPEC``: many scenes, one output folder each, one bad scene sinks none."""

from __future__ import annotations

import click

from geoseg.cli.options import STATE, overwrite_option, set_option, verbosity


@click.command("batch")
@click.argument("config", required=False, type=click.Path(dir_okay=True, path_type=str))
@click.option("--scenes", "scenes_spec",
              help="Glob (quoted), text file with one raster path per line, or STAC ItemCollection JSON.")
@set_option
@overwrite_option
@click.option("--force", is_flag=True, help="Redo every scene, also those finished with the same inputs and config.")
@click.option("--retry-failed", is_flag=True, help="Run scenes again whose unchanged input failed in an earlier batch.")
@click.option("--allow-empty", is_flag=True, help="Succeed when --scenes matches nothing (a night without scenes).")
@click.option("--shard", metavar="K/N", help="Run only shard K of N of the scenes (0 <= K < N: scenes K, K+N, ...); "
              "shards of one batch run at once and merge their rows into batch.json (a SLURM job array's task).")
@click.option("--submit", "submit_tasks", type=click.IntRange(1, 100000), metavar="N",
              help="Submit the batch as a SLURM job array of N tasks, each a shard on its own node with a local "
              "cluster, and return; watch it with --status OUTPUT_DIR.")
@click.option("--sbatch", "sbatch_args", default="", metavar="'OPTIONS'",
              help="sbatch options for --submit, quoted as one, e.g. --sbatch '-p gpu --gres=gpu:1 -t 04:00:00'.")
@click.option("--status", "status_of", type=click.Path(file_okay=False, path_type=str), metavar="OUTPUT_DIR",
              help="Print the progress of the batch writing into OUTPUT_DIR (or its end): counts, the running, "
              "failed and slowest scenes; runs nothing.")
@verbosity
def command(config: str | None, scenes_spec: str | None, overrides: tuple[str, ...], overwrite: bool, force: bool,
            retry_failed: bool, allow_empty: bool, shard: str | None, submit_tasks: int | None,
            sbatch_args: str, status_of: str | None) -> None:
    """Run the pipeline on every scene into OUTPUT_DIR/<scene>/; skip finished scenes; write batch.json/.csv.

    The manifest is rewritten as scenes finish (every few seconds at most): ``geoseg batch --status
    OUTPUT_DIR`` shows the night's progress.

    Exit codes: 0 every scene done or skipped, 3 some scenes failed, 130 interrupted (rerun to continue),
    1 nothing could run (configuration, input, output folder, cluster), 2 a usage error, 4 an internal error
    (a bug in geoseg).
    """
    from pathlib import Path

    from geoseg.batch import batch_status, expand_scenes, run_batch
    from geoseg.errors import EXIT_SCENES_FAILED, NoScenesError
    from geoseg.pipeline import load_pipeline

    if status_of is not None:
        click.echo(batch_status(Path(status_of)))
        return
    if config is None or scenes_spec is None:
        raise click.UsageError("give a PIPELINE.yaml and --scenes (or --status OUTPUT_DIR)")

    # The scenes come from --scenes: the pipeline's own input (a sample scene in the shipped YAMLs) is neither
    # read nor required to exist.
    overrides = ("input=null", *overrides)
    if overwrite:
        overrides = (*overrides, "overwrite=true")
    cfg = load_pipeline(config, overrides)
    try:
        scenes = expand_scenes(scenes_spec, cfg.batch.stac_asset)
    except NoScenesError:
        if allow_empty:
            click.echo(f"geoseg: no scenes: --scenes {scenes_spec!r} matches no file; nothing to do", err=True)
            return
        raise
    if submit_tasks is not None:
        import shlex

        from geoseg.hpc import submit_array

        flags = [f for f, on in (("--force", force), ("--retry-failed", retry_failed),
                                 ("--verbose", STATE["verbose"])) if on]
        job = submit_array(config, scenes_spec, overrides[1:], submit_tasks, cfg.output_dir,
                           shlex.split(sbatch_args), flags)
        click.echo(f"submitted SLURM job array {job} ({submit_tasks} tasks); progress: geoseg batch --status "
                   f"{cfg.output_dir}", err=True)
        return
    report = run_batch(cfg, scenes, force=force, retry_failed=retry_failed, shard=_shard(shard))
    counts = report.counts()
    click.echo(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; manifest {report.path}", err=True)
    if not report.ok:
        raise click.exceptions.Exit(EXIT_SCENES_FAILED)


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not K/N, e.g. 0/4", param_hint="--shard") from None
    if n < 1 or not 0 <= k < n:
        raise click.BadParameter(f"{text}: K must be 0 to N-1", param_hint="--shard")
    return k, n

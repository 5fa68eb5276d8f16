"""``geoseg run SCENE.tif`` or ``geoseg run PIPELINE.yaml``: one scene through every stage."""

from __future__ import annotations

from pathlib import Path

import click

from geoseg.cli.options import overwrite_option, set_option, verbosity
from geoseg.errors import ConfigError


def source_kind(path: Path) -> str:
    """``yaml`` for a pipeline file, ``raster`` for anything else GDAL may read (GeoTIFF, VRT, ...)."""
    if not path.exists():
        raise ConfigError(f"{path}: not found; expected a raster (GeoTIFF, COG, VRT, ...) or a pipeline YAML")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a raster or a pipeline YAML")
    if path.suffix.lower() in (".yaml", ".yml"):
        return "yaml"
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "raster"
    if "\x00" in text or text.lstrip().startswith("<"):  # binary, or XML (a VRT)
        return "raster"
    import yaml

    try:
        return "yaml" if isinstance(yaml.safe_load(path.read_text()), dict) else "raster"
    except (yaml.YAMLError, UnicodeDecodeError):
        return "raster"


def _cli_overrides(output_dir: str | None, model: str | None, co: tuple[str, ...]) -> list[str]:
    """``--set`` style overrides of the command's own options (paths made absolute: they are the cwd's)."""
    out = []
    if output_dir:
        out.append(f"output_dir={Path(output_dir).absolute()}")
    if model:
        out.append(f"model={Path(model).absolute()}")
    for item in co:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--co {item!r}: expected KEY=VALUE, e.g. --co BLOCKSIZE=256")
        out.append(f"write.creation_options.{key.strip().upper()}={value!r}")
    return out


@click.command("run")
@click.argument("source", type=click.Path(path_type=str))
@click.option("-o", "--output-dir", default=None, help="Output folder [default: the pipeline's, or ./SCENE-landcover "
              "for a raster].")
@click.option("--model", default=None, help="Model checkpoint (.safetensors from geoseg train).")
@click.option("--config", "config", default=None, help="Pipeline YAML whose settings to use for a raster SOURCE "
              "[default: the shipped defaults].")
@click.option("--co", multiple=True, metavar="KEY=VALUE", help="GDAL creation option of the rasters (COG), "
              "e.g. --co BLOCKSIZE=256 (repeatable).")
@set_option
@overwrite_option
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@verbosity
def command(source: str, output_dir: str | None, model: str | None, config: str | None, co: tuple[str, ...],
            overrides: tuple[str, ...], overwrite: bool, progress: bool | None) -> None:
    """Segment SOURCE into a land-cover GeoTIFF and its companions (polygons, styles, metrics, STAC, manifest).

    SOURCE is a raster (the shipped default pipeline runs on it; give --model) or a pipeline YAML. Every
    config key stays reachable with --set KEY=VALUE.
    """
    from geoseg.config import PipelineConfig, load_config, raster_config
    from geoseg.models import read_model_spec
    from geoseg.pipeline import check_model_fits, run_pipeline

    path = Path(source)
    extra = _cli_overrides(output_dir, model, co) + (["overwrite=true"] if overwrite else [])
    if source_kind(path) == "yaml":
        if config:
            raise ConfigError(f"--config {config}: SOURCE {path.name} is a pipeline already; give a raster as SOURCE "
                              "to run it with --config's settings")
        cfg: PipelineConfig = load_config(path, [*overrides, *extra])
        where = path.name
    else:
        if config and Path(config).exists() and source_kind(Path(config)) == "raster":
            raise ConfigError(f"--config {config}: is a raster, not a pipeline YAML; give it as SOURCE: "
                              f"geoseg run {config}")
        cfg = raster_config(path, [*overrides, *extra], config)
        where = config or "geoseg run"
    spec = read_model_spec(cfg.model)  # read once: run_pipeline takes it as checked
    check_model_fits(cfg, spec, where)
    result = run_pipeline(cfg, progress=progress, spec=spec)
    t = result.timings
    summary = f"wrote {result.landcover} ({sum(t.values()):.1f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    metrics = result.metrics or {}
    if metrics.get("mean_iou") is not None:
        summary += f"); mIoU {metrics['mean_iou']:.4f} over {len(metrics.get('mean_iou_classes', []))} classes, " \
                   f"overall accuracy {metrics['overall_accuracy']:.4f}"
    else:
        summary += ")"
    click.echo(summary, err=True)
    click.echo(f"manifest {result.manifest}", err=True)

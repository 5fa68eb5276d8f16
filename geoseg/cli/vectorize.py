"""``geoseg vectorize RASTER OUTPUT``: polygons of any class-id GeoTIFF."""

from __future__ import annotations

from typing import Any

import click

from geoseg.cli.options import verbosity
from geoseg.config import VectorizeConfig

_DEFAULTS = VectorizeConfig.model_fields


def _default(name: str) -> str:
    return f" [default: {_DEFAULTS[name].default}]"


@click.command("vectorize")
@click.argument("raster", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option("--layer", default=None, help="Layer name (GeoPackage)." + _default("layer"))
@click.option("--connectivity", type=click.Choice(["4", "8"]), default=None, help="Pixel connectivity."
              + _default("connectivity"))
@click.option("--min-area-px", type=int, default=None, help="Minimum mapping unit in pixels." + _default("min_area_px"))
@click.option("--min-area-m2", type=float, default=None, help="Minimum mapping unit in square metres (projected "
              "CRS; the larger unit applies)." + _default("min_area_m2"))
@click.option("--simplify", type=float, default=None, help="Topology-preserving simplification tolerance (CRS units)."
              + _default("simplify"))
@click.option("--block", type=int, default=None, help="Block side in pixels." + _default("block"))
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@verbosity
def command(raster: str, output: str, layer: str | None, connectivity: str | None, min_area_px: int | None,
            min_area_m2: float | None, simplify: float | None, block: int | None, overwrite: bool) -> None:
    """Polygonize RASTER block by block, merge across blocks, write OUTPUT (.gpkg or .fgb)."""
    from pathlib import Path

    from geoseg.config import validate
    from geoseg.vectorize import vectorize_classes

    flags: dict[str, Any] = {"layer": layer, "connectivity": int(connectivity) if connectivity else None,
                             "min_area_px": min_area_px, "min_area_m2": min_area_m2, "simplify": simplify,
                             "block": block}
    cfg = validate(VectorizeConfig, {k: v for k, v in flags.items() if v is not None}, "geoseg vectorize", None)
    info = vectorize_classes(Path(raster), Path(output), cfg, overwrite=overwrite)
    click.echo(f"wrote {info['features']} polygons to {info['path']}", err=True)

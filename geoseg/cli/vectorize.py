"""``geoseg vectorize RASTER OUTPUT``: polygons of any class-id GeoTIFF."""

from __future__ import annotations

import click


@click.command("vectorize")
@click.argument("raster", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option("--layer", default="landcover", show_default=True, help="Layer name (GeoPackage).")
@click.option("--connectivity", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--min-area-px", type=click.IntRange(0), default=0, show_default=True, help="Minimum mapping unit.")
@click.option("--simplify", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Topology-preserving simplification tolerance (CRS units).")
@click.option("--block", type=click.IntRange(64), default=2048, show_default=True, help="Block side in pixels.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
def command(raster: str, output: str, layer: str, connectivity: str, min_area_px: int, simplify: float, block: int,
            overwrite: bool) -> None:
    """Polygonize RASTER block by block, merge across blocks, write OUTPUT (.gpkg or .fgb)."""
    from pathlib import Path

    from geoseg.vectorize import VectorizeOptions, vectorize_classes

    opts = VectorizeOptions(layer=layer, connectivity=int(connectivity), min_area_px=min_area_px, simplify=simplify,
                            block=block)
    info = vectorize_classes(Path(raster), Path(output), opts, overwrite=overwrite)
    click.echo(f"wrote {info['features']} polygons to {info['path']}", err=True)

"""``geoseg sample OUT_DIR``: a synthetic scene with its land-cover reference map."""

from __future__ import annotations

import click

from geoseg.cli.options import overwrite_option, verbosity


@click.command("sample")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--size", default=1024, show_default=True, type=click.IntRange(1, 200_000), help="Height in pixels.")
@click.option("--width", default=None, type=click.IntRange(1, 200_000), help="Width in pixels (default: --size).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; same seed, same scene.")
@click.option("--crs", default="EPSG:32631", show_default=True, help="Projected CRS of the scene.")
@click.option("--resolution", default=10.0, show_default=True, type=float, help="Pixel size in CRS units.")
@overwrite_option
@verbosity
def command(out_dir: str, size: int, width: int | None, seed: int, crs: str, resolution: float,
            overwrite: bool) -> None:
    """Write OUT_DIR/scene.tif (4-band uint16) and OUT_DIR/labels.tif (land-cover classes)."""
    from rasterio.errors import CRSError

    from geoseg.errors import InputError
    from geoseg.sample import make_sample

    try:
        paths = make_sample(out_dir, size, seed, width=width, crs=crs, resolution=resolution, overwrite=overwrite)
    except CRSError as exc:
        raise InputError(f"--crs {crs!r}: not a CRS ({exc})") from None
    click.echo(f"wrote {paths.image} and {paths.labels}", err=True)

"""``geoseg export MODEL --format onnx``: a checkpoint for other runtimes, verified against torch."""

from __future__ import annotations

import click

from geoseg.cli.options import verbosity


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Where to write it [default: MODEL with the format's extension].")
@click.option("--tile", type=int, default=None, help="Tile side of the check [default: the model's tile size].")
@click.option("--verify", "verify_with", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Raster whose tiles the export is checked on (default: synthetic tiles).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@verbosity
def command(model: str, fmt: str, output: str | None, tile: int | None, verify_with: str | None,
            overwrite: bool) -> None:
    """Write MODEL (a geoseg checkpoint) as ONNX, with its bands, normalisation and classes as metadata."""
    from pathlib import Path

    from geoseg.export import export_onnx

    out = Path(output) if output else Path(model).with_suffix(".onnx")
    info = export_onnx(Path(model), out, tile=tile, verify_with=Path(verify_with) if verify_with else None,
                       overwrite=overwrite)
    click.echo(f"wrote {info['path']}: ONNX Runtime classifies {info['agreement']:.4%} of {info['tiles']} "
               f"{info['tile']} px tiles ({info['verified_on']}) as torch does", err=True)

"""``geoseg evaluate PREDICTION REFERENCE``: per-class IoU of a land-cover raster against a reference."""

from __future__ import annotations

import json

import click


@click.command("evaluate")
@click.argument("prediction", type=click.Path(path_type=str))
@click.argument("reference", type=click.Path(path_type=str))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write metrics.json here instead of printing it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def command(prediction: str, reference: str, out_path: str | None, overwrite: bool) -> None:
    """Confusion matrix and per-class IoU, mIoU and overall accuracy of PREDICTION against REFERENCE."""
    from pathlib import Path

    from geoseg._io import atomic_path
    from geoseg.evaluate import evaluate_rasters

    report = evaluate_rasters(Path(prediction), Path(reference))
    text = json.dumps(report, indent=2) + "\n"
    if out_path is None:
        click.echo(text, nl=False)
        return
    with atomic_path(Path(out_path), overwrite=overwrite) as tmp:
        tmp.write_text(text)
    click.echo(f"mIoU {report['mean_iou']:.4f}; wrote {out_path}", err=True)

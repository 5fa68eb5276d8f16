"""``geoseg evaluate PREDICTION REFERENCE``: per-class IoU and companions against a reference map."""

from __future__ import annotations

import json

import click


def _pairs(values: tuple[str, ...]) -> dict[int, int]:
    out = {}
    for item in values:
        code, sep, cid = item.partition("=")
        try:
            out[int(code)] = int(cid)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected CODE=CLASS_ID, e.g. 11=1", param_hint="--map") from None
    return out


@click.command("evaluate")
@click.argument("prediction", type=click.Path(path_type=str))
@click.argument("reference", type=click.Path(path_type=str))
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Write metrics.json, metrics.csv, report.md and figures here (default: print JSON).")
@click.option("--attribute", default="class", show_default=True, help="Class attribute of a vector reference.")
@click.option("--layer", default=None, help="Layer of a multi-layer vector reference.")
@click.option("--map", "mapping", multiple=True, metavar="CODE=ID", help="Map a reference code to a class id.")
@click.option("--ignore", multiple=True, type=int, metavar="CODE", help="Reference code to leave out.")
@click.option("--nodata", type=float, default=None, help="Reference nodata value (overrides the file's).")
@click.option("--block", type=click.IntRange(16), default=2048, show_default=True, help="Window side for streaming.")
@click.option("--overwrite", is_flag=True, help="Replace existing report files.")
def command(prediction: str, reference: str, out_dir: str | None, attribute: str, layer: str | None,
            mapping: tuple[str, ...], ignore: tuple[int, ...], nodata: float | None, block: int,
            overwrite: bool) -> None:
    """Confusion matrix, per-class IoU/precision/recall/F1, mIoU, OA and kappa of PREDICTION vs REFERENCE.

    REFERENCE is a raster on any grid (warped with nearest neighbour) or a vector file with a class attribute.
    """
    from pathlib import Path

    from geoseg.evaluate import Reference, evaluate_iou
    from geoseg.report import write_reports

    ref = Reference(Path(reference), attribute, _pairs(mapping), tuple(ignore), nodata, layer)
    report = evaluate_iou(Path(prediction), ref, block=block)
    if out_dir is None:
        click.echo(json.dumps(report, indent=2))
        return
    paths = write_reports(report, Path(out_dir), overwrite=overwrite)
    click.echo(f"mIoU {report['mean_iou']:.4f}, overall accuracy {report['overall_accuracy']:.4f}; "
               f"wrote {paths['report']}", err=True)

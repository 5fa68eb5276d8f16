"""``geoseg evaluate PREDICTION REFERENCE``: per-class IoU and companions against a reference map."""

from __future__ import annotations

import json
from typing import Any

import click

from geoseg.cli.options import verbosity
from geoseg.config import EvaluateConfig

_DEFAULTS = EvaluateConfig.model_fields


def _pairs(values: tuple[str, ...]) -> dict[int, int]:
    out = {}
    for item in values:
        code, _, cid = item.partition("=")
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
@click.option("--attribute", default=None, help=f"Class attribute of a vector reference [default: "
              f"{_DEFAULTS['attribute'].default}].")
@click.option("--layer", default=None, help="Layer of a multi-layer vector reference.")
@click.option("--map", "mapping", multiple=True, metavar="CODE=ID", help="Map a reference code to a class id.")
@click.option("--ignore", multiple=True, type=int, metavar="CODE", help="Reference code to leave out.")
@click.option("--nodata", type=float, default=None, help="Reference nodata value (overrides the file's).")
@click.option("--block", type=int, default=None, help=f"Window side for streaming [default: "
              f"{_DEFAULTS['block'].default}].")
@click.option("--overwrite", is_flag=True, help="Replace existing report files.")
@verbosity
def command(prediction: str, reference: str, out_dir: str | None, attribute: str | None, layer: str | None,
            mapping: tuple[str, ...], ignore: tuple[int, ...], nodata: float | None, block: int | None,
            overwrite: bool) -> None:
    """Confusion matrix, per-class IoU/precision/recall/F1, mIoU, OA and kappa of PREDICTION vs REFERENCE.

    REFERENCE is a raster on any grid (warped with nearest neighbour) or a vector file with a class attribute.
    """
    from pathlib import Path

    from geoseg.config import validate
    from geoseg.evaluate import evaluate_iou
    from geoseg.report import write_reports

    flags: dict[str, Any] = {"reference": reference, "attribute": attribute, "layer": layer,
                             "mapping": _pairs(mapping), "ignore": list(ignore), "nodata": nodata, "block": block}
    cfg = validate(EvaluateConfig, {k: v for k, v in flags.items() if v is not None}, "geoseg evaluate", None)
    metrics = evaluate_iou(Path(prediction), cfg)
    if out_dir is None:
        click.echo(json.dumps(metrics.to_dict(), indent=2))
        return
    paths = write_reports(metrics, Path(out_dir), overwrite=overwrite)
    click.echo(f"mIoU {metrics.mean_iou:.4f}, overall accuracy {metrics.overall_accuracy:.4f}; "
               f"wrote {paths['report']}", err=True)

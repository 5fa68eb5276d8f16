"""Evaluate stage: a land-cover raster against a reference map, streamed block by block.

The reference may be a raster on any grid (warped onto the prediction grid with nearest neighbour through a
:class:`rasterio.vrt.WarpedVRT`, one window at a time) or a vector layer with a class attribute (the
features of each window rasterized onto it). Reference codes are mapped to model classes; ignored codes and
nodata are not counted, and codes that map to no class are reported. Every block yields a confusion matrix
(one ``bincount``); the matrices are summed, so the numbers are identical whatever the chunking or the
number of workers, and memory does not depend on the raster size.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geoseg.errors import InputError

VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".gml", ".kml"}
_NO_REF = -1  # rasterize fill: no reference feature here


@dataclass(frozen=True)
class Reference:
    """How to read a reference map and map its codes to model class ids."""

    path: Path
    attribute: str = "class"
    """Class attribute of a vector reference."""
    mapping: dict[int, int] = field(default_factory=dict)
    """Reference code -> class id; codes not listed map to the class with the same id, if any."""
    ignore: tuple[int, ...] = ()
    nodata: float | None = None
    """Overrides the reference raster's own nodata."""
    layer: str | None = None

    @property
    def is_vector(self) -> bool:
        return self.path.suffix.lower() in VECTOR_SUFFIXES


# ----------------------------------------------------------------------------------------------- matrices


def confusion_matrix(reference: np.ndarray, prediction: np.ndarray, n_classes: int,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """``(n, n)`` int64 counts, rows = reference class index, columns = predicted class index.

    Pixels outside ``0 <= index < n_classes`` in either map, or where ``mask`` is False, are not counted.
    """
    ref = np.asarray(reference).ravel().astype(np.int64, copy=False)
    pred = np.asarray(prediction).ravel().astype(np.int64, copy=False)
    keep = (ref >= 0) & (ref < n_classes) & (pred >= 0) & (pred < n_classes)
    if mask is not None:
        keep &= np.asarray(mask).ravel()
    return np.bincount(ref[keep] * n_classes + pred[keep], minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for a class absent from both maps."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in the reference (rows with support)."""
    iou = iou_per_class(cm)
    present = cm.sum(1) > 0
    return float(np.nanmean(iou[present])) if present.any() else float("nan")


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def metrics_from_confusion(cm: np.ndarray, classes: list[dict]) -> dict:
    """Per-class IoU, precision, recall, F1, support and the summary scores, from a confusion matrix.

    A class absent from both maps has no IoU (``None``) and is left out of the means; the mean IoU is over
    the classes present in the reference, named in ``mean_iou_classes``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    rows = []
    for k, c in enumerate(classes):
        fp, fn = int(predicted[k] - tp[k]), int(support[k] - tp[k])
        rows.append({
            "id": c["id"], "name": c["name"], "color": c.get("color"), "support": int(support[k]),
            "predicted": int(predicted[k]),
            "iou": _ratio(tp[k], tp[k] + fp + fn), "precision": _ratio(tp[k], tp[k] + fp),
            "recall": _ratio(tp[k], tp[k] + fn), "f1": _ratio(2 * tp[k], 2 * tp[k] + fp + fn),
        })
    present = [r for r in rows if r["support"] > 0]
    ious = [r["iou"] for r in present]
    pe = float((support.astype(np.float64) * predicted).sum()) / total**2 if total else 0.0
    po = float(tp.sum()) / total if total else None
    return {
        "classes": rows,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "mean_iou_classes": [r["name"] for r in present],
        "frequency_weighted_iou": (float(sum(r["support"] * r["iou"] for r in present) / total) if total else None),
        "overall_accuracy": po,
        "kappa": (po - pe) / (1 - pe) if total and pe < 1 else None,
        "pixels": total,
        "confusion_matrix": cm.tolist(),
    }


# ----------------------------------------------------------------------------------------------- reading


def _code_lut(ref: Reference, class_ids: list[int], max_code: int) -> np.ndarray:
    """Lookup: reference code -> class index, -2 ignored, -3 unmapped."""
    lut = np.full(max_code + 1, -3, dtype=np.int64)
    index = {cid: k for k, cid in enumerate(class_ids)}
    for cid, k in index.items():
        if 0 <= cid <= max_code:
            lut[cid] = k
    for code, cid in ref.mapping.items():
        if cid not in index:
            raise InputError(f"evaluate.mapping: {code}: {cid} is not a class id of the model ({class_ids})")
        if 0 <= code <= max_code:
            lut[code] = index[cid]
    for code in ref.ignore:
        if 0 <= code <= max_code:
            lut[code] = -2
    return lut


def _read_reference_raster(ref: Reference, pred_grid: dict, window: Window) -> tuple[np.ndarray, np.ndarray]:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with rasterio.open(ref.path) as src:
        nodata = ref.nodata if ref.nodata is not None else src.nodata
        same = (src.crs == pred_grid["crs"] and src.transform == pred_grid["transform"]
                and (src.width, src.height) == (pred_grid["width"], pred_grid["height"]))
        if same:
            data = src.read(1, window=window)
            valid = data != nodata if nodata is not None else src.read_masks(1, window=window) > 0
            return data, valid
        with WarpedVRT(src, crs=pred_grid["crs"], transform=pred_grid["transform"], width=pred_grid["width"],
                       height=pred_grid["height"], resampling=Resampling.nearest,
                       src_nodata=nodata, nodata=nodata) as vrt:
            data = vrt.read(1, window=window)
            valid = vrt.read_masks(1, window=window) > 0
            return data, valid


def _read_reference_vector(ref: Reference, pred_grid: dict, window: Window) -> tuple[np.ndarray, np.ndarray]:
    import pyogrio
    from rasterio.features import rasterize
    from rasterio.warp import transform_bounds
    from rasterio.windows import bounds as window_bounds
    from rasterio.windows import transform as window_transform

    info = pyogrio.read_info(ref.path, layer=ref.layer)
    bbox = window_bounds(window, pred_grid["transform"])
    if info["crs"] and str(info["crs"]) != str(pred_grid["crs"]):
        bbox = transform_bounds(pred_grid["crs"], info["crs"], *bbox, densify_pts=21)
    frame = pyogrio.read_dataframe(ref.path, layer=ref.layer, columns=[ref.attribute], bbox=tuple(bbox))
    shape = (int(window.height), int(window.width))
    if frame.empty:
        return np.full(shape, _NO_REF, dtype=np.int64), np.zeros(shape, dtype=bool)
    if frame.crs is not None and frame.crs != pred_grid["crs"]:
        frame = frame.to_crs(pred_grid["crs"])
    values = frame[ref.attribute].to_numpy()
    # rasterio warns NotGeoreferenced, spuriously, when threads make in-memory datasets at once
    # (odc-geo#131); as in vectorize, a process-wide filter since catch_warnings is not thread-safe.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")
    data = rasterize(
        ((geom, int(v)) for geom, v in zip(frame.geometry, values) if geom is not None and v is not None),
        out_shape=shape, transform=window_transform(window, pred_grid["transform"]), fill=_NO_REF, dtype="int32",
    ).astype(np.int64)
    return data, data != _NO_REF


def block_confusion(prediction: str, ref: Reference, pred_grid: dict, window: Window,
                    class_ids: list[int]) -> tuple[np.ndarray, dict[int, int]]:
    """Confusion matrix of one window, and the counts of reference codes that map to no class."""
    import rasterio

    with rasterio.open(prediction) as pred_ds:
        pred = pred_ds.read(1, window=window)
        # A nodata value is cheaper to test than decoding the dataset mask a second time.
        pred_valid = pred != pred_ds.nodata if pred_ds.nodata is not None else pred_ds.read_masks(1, window=window) > 0
    reader = _read_reference_vector if ref.is_vector else _read_reference_raster
    codes, ref_valid = reader(ref, pred_grid, window)
    n = len(class_ids)
    valid = pred_valid & ref_valid
    if codes.dtype.kind == "f":
        valid &= np.isfinite(codes) & (codes == np.round(codes))
    if codes.dtype.kind in "if":
        valid &= codes >= 0
    codes = np.where(valid, codes, 0).astype(np.int64, copy=False)
    max_code = max(int(codes.max(initial=0)), max(class_ids), *ref.mapping.keys(), *ref.ignore, 0)
    lut = _code_lut(ref, class_ids, max_code)
    ref_index = lut[codes]
    pred_lut = np.full(max(int(pred.max(initial=0)), max(class_ids)) + 1, -1, dtype=np.int64)
    pred_lut[class_ids] = np.arange(n)
    pred_index = pred_lut[pred.astype(np.int64, copy=False).clip(0)]
    counted = valid & (pred_index >= 0)
    unmapped: dict[int, int] = {}
    orphan = counted & (ref_index == -3)
    if orphan.any():
        hist = np.bincount(codes[orphan].ravel())
        unmapped = {int(c): int(hist[c]) for c in np.flatnonzero(hist)}
    return confusion_matrix(ref_index, pred_index, n, counted), unmapped


# ----------------------------------------------------------------------------------------------- driver


def _prediction_grid(prediction: Path) -> tuple[dict, list[dict]]:
    from geoseg.read import open_raster

    with open_raster(prediction) as ds:
        raw = ds.tags().get("GEOSEG_CLASSES")
        if not raw:
            raise InputError(f"{prediction}: no GEOSEG_CLASSES metadata; is it a geoseg land-cover raster?")
        grid = {"crs": ds.crs, "transform": ds.transform, "width": ds.width, "height": ds.height}
        return grid, json.loads(raw)


def _check_overlap(ref: Reference, grid: dict) -> None:
    """Refuse a reference that does not overlap the prediction at all (and say where each lies)."""
    from rasterio.coords import disjoint_bounds
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    from geoseg.read import open_raster

    west, south, east, north = array_bounds(grid["height"], grid["width"], grid["transform"])
    pred_bounds = (west, south, east, north)
    if not ref.path.exists():
        raise InputError(f"{ref.path}: reference not found")
    if ref.is_vector:
        import pyogrio

        try:
            info = pyogrio.read_info(ref.path, layer=ref.layer)
        except Exception as exc:  # noqa: BLE001 - pyogrio raises several types for unreadable files
            raise InputError(f"{ref.path}: not a vector file OGR can read ({exc})") from None
        if ref.attribute not in list(info["fields"]):
            raise InputError(f"{ref.path}: no attribute {ref.attribute!r}; available: {', '.join(info['fields'])}"
                             " (set evaluate.attribute)")
        ref_crs, ref_bounds = info["crs"], info["total_bounds"]
    else:
        with open_raster(ref.path) as src:
            if src.crs is None:
                raise InputError(f"{ref.path}: reference has no CRS")
            ref_crs, ref_bounds = src.crs, src.bounds
    if ref_crs is None:
        raise InputError(f"{ref.path}: reference has no CRS")
    in_pred_crs = transform_bounds(ref_crs, grid["crs"], *ref_bounds, densify_pts=21)
    if disjoint_bounds(in_pred_crs, pred_bounds) or in_pred_crs[0] >= east or in_pred_crs[2] <= west:
        raise InputError(f"{ref.path}: reference does not overlap the prediction (reference bounds "
                         f"{tuple(round(v, 2) for v in in_pred_crs)}, prediction {tuple(round(v, 2) for v in pred_bounds)})")


def evaluate_iou(prediction: Path, ref: Reference, *, client=None, block: int = 2048) -> dict:  # noqa: ANN001
    """Metrics of a geoseg land-cover raster against a reference, streamed in ``block`` x ``block`` windows.

    With a ``client`` the blocks run on the Dask cluster; otherwise on two local threads.
    """
    import dask

    from geoseg.cluster import for_each_result

    grid, classes = _prediction_grid(Path(prediction))
    _check_overlap(ref, grid)
    class_ids = [c["id"] for c in classes]
    windows = [Window(c0, r0, min(block, grid["width"] - c0), min(block, grid["height"] - r0))
               for r0 in range(0, grid["height"], block) for c0 in range(0, grid["width"], block)]
    tasks = [dask.delayed(block_confusion, pure=True)(str(prediction), ref, grid, w, class_ids)
             for w in windows]
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    unmapped: dict[int, int] = {}

    def _add(part: tuple[np.ndarray, dict[int, int]]) -> None:
        nonlocal cm
        cm += part[0]
        for code, count in part[1].items():
            unmapped[code] = unmapped.get(code, 0) + count

    for_each_result(tasks, _add, client)
    if cm.sum() == 0:
        raise InputError(f"{ref.path}: no pixel is valid in both the prediction and the reference")
    report = metrics_from_confusion(cm, classes)
    report.update(prediction=str(prediction), reference=str(ref.path),
                  unmapped_reference_codes={str(k): v for k, v in sorted(unmapped.items())})
    return report

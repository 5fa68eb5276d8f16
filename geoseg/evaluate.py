"""Evaluate stage: confusion matrices and the metrics derived from them.

Matrices are mergeable parts (one per block, summed), so the numbers do not depend on chunking.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(reference: np.ndarray, prediction: np.ndarray, n_classes: int,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """``(n, n)`` int64 counts, rows = reference class index, columns = predicted class index.

    Pixels outside ``0 <= index < n_classes`` in either map, or where ``mask`` is False, are not counted.
    """
    ref = np.asarray(reference).ravel().astype(np.int64)
    pred = np.asarray(prediction).ravel().astype(np.int64)
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


def _classes_of(path, ds) -> list[dict]:  # noqa: ANN001
    import json

    from geoseg.errors import InputError

    raw = ds.tags().get("GEOSEG_CLASSES")
    if not raw:
        raise InputError(f"{path}: no GEOSEG_CLASSES metadata; is it a geoseg land-cover raster?")
    return json.loads(raw)


def evaluate_rasters(prediction, reference, block: int = 2048) -> dict:  # noqa: ANN001
    """Metrics of a geoseg land-cover raster against a reference raster on the same grid.

    Reference codes are taken as class ids; the nodata of either raster is not counted. Read block by
    block, so memory does not depend on the raster size.
    """
    from rasterio.windows import Window

    from geoseg.errors import InputError
    from geoseg.read import open_raster

    with open_raster(prediction) as pred_ds, open_raster(reference) as ref_ds:
        if (pred_ds.width, pred_ds.height, pred_ds.transform, pred_ds.crs) != (
            ref_ds.width, ref_ds.height, ref_ds.transform, ref_ds.crs
        ):
            raise InputError(f"{reference}: grid differs from {prediction} (shape, transform or CRS)")
        classes = _classes_of(prediction, pred_ds)
        ids = [c["id"] for c in classes]
        lut = np.full(65536, -1, dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        cm = np.zeros((len(ids), len(ids)), dtype=np.int64)
        for r0 in range(0, pred_ds.height, block):
            for c0 in range(0, pred_ds.width, block):
                win = Window(c0, r0, min(block, pred_ds.width - c0), min(block, pred_ds.height - r0))
                p = pred_ds.read(1, window=win).astype(np.int64)
                r = ref_ds.read(1, window=win).astype(np.int64)
                mask = (pred_ds.read_masks(1, window=win) > 0) & (ref_ds.read_masks(1, window=win) > 0)
                cm += confusion_matrix(lut[r.clip(0, 65535)], lut[p.clip(0, 65535)], len(ids), mask)
    iou = iou_per_class(cm)
    total = cm.sum()
    return {
        "prediction": str(prediction),
        "reference": str(reference),
        "classes": [
            {**c, "iou": None if np.isnan(v) else float(v), "support": int(cm[k].sum())}
            for k, (c, v) in enumerate(zip(classes, iou))
        ],
        "mean_iou": mean_iou(cm),
        "overall_accuracy": float(np.trace(cm) / total) if total else None,
        "pixels": int(total),
        "confusion_matrix": cm.tolist(),
    }

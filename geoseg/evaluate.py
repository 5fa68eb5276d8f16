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
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geoseg.classes import ClassMap
from geoseg.config import EvaluateConfig
from geoseg.errors import InputError
from geoseg.grid import RasterGrid, block_rows

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.progress import Progress

VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".gml", ".kml"}
_NO_REF = -1  # rasterize fill: no reference feature here


def is_vector(path: Path) -> bool:
    """Whether a reference file is read as vector features (by its extension)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


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


def class_edges(index: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pixels of ``index`` (class indexes) whose right or lower neighbour holds another class, both valid."""
    edges = np.zeros(index.shape, dtype=bool)
    right = (index[:, 1:] != index[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    down = (index[1:] != index[:-1]) & valid[1:] & valid[:-1]
    edges[:, :-1] |= right
    edges[:-1] |= down
    return edges


def boundary_fscore(reference: np.ndarray, prediction: np.ndarray, valid: np.ndarray,
                    tolerance: float = 2.0) -> dict[str, float | None]:
    """Boundary precision, recall and F-score of two class-index maps, within ``tolerance`` pixels.

    Precision: the share of the prediction's class-edge pixels that lie within ``tolerance`` (Euclidean) of
    a reference edge pixel; recall the reverse; both over the pixels ``valid`` in both maps (the boundary
    F1 of Csurka et al., 2013, per map rather than per class).
    """
    from scipy import ndimage

    ref, pred = class_edges(reference, valid), class_edges(prediction, valid)
    if not ref.any() or not pred.any():
        return {"precision": None, "recall": None, "f_score": None}
    near_ref = ndimage.distance_transform_edt(~ref) <= tolerance
    near_pred = ndimage.distance_transform_edt(~pred) <= tolerance
    precision = float((pred & near_ref).sum() / pred.sum())
    recall = float((ref & near_pred).sum() / ref.sum())
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f_score": f}


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


@dataclass(frozen=True)
class Metrics:
    """Scores of a prediction against a reference, derived from one confusion matrix.

    Rows of ``confusion`` are reference classes, columns predicted classes, both in ``classes`` order.
    Metrics of parts (blocks, scenes) :meth:`merge` into the metrics of the whole, so the numbers do not
    depend on the chunking or the number of workers. A class absent from both maps has no IoU (``None``)
    and is left out of the means; the mean IoU is over the classes present in the reference.
    """

    confusion: np.ndarray
    classes: ClassMap
    unmapped: dict[int, int] = field(default_factory=dict)
    """Pixels per reference code that maps to no class (not counted)."""
    prediction: str = ""
    reference: str = ""
    pixel_area_m2: float | None = None
    """Area of a pixel of the compared grid: the per-class areas (ha) derive from it."""

    @classmethod
    def empty(cls, classes: ClassMap, **kw: Any) -> Metrics:
        """No pixel counted yet."""
        n = len(classes)
        return cls(np.zeros((n, n), dtype=np.int64), classes, **kw)

    def merge(self, other: Metrics) -> Metrics:
        """The metrics of both parts together."""
        unmapped = dict(self.unmapped)
        for code, count in other.unmapped.items():
            unmapped[code] = unmapped.get(code, 0) + count
        return Metrics(self.confusion + other.confusion, self.classes, unmapped, self.prediction or other.prediction,
                       self.reference or other.reference, self.pixel_area_m2 or other.pixel_area_m2)

    @property
    def pixels(self) -> int:
        """Pixels counted."""
        return int(self.confusion.sum())

    @cached_property
    def per_class(self) -> list[dict[str, Any]]:
        """IoU, precision, recall, F1, support and predicted pixels (and hectares) of every class.

        In the remote-sensing names: the user's accuracy is the precision (of the map), the producer's
        accuracy the recall (of the reference); both are in each row under those names too.
        """
        cm = np.asarray(self.confusion, dtype=np.int64)
        tp = np.diag(cm)
        support, predicted = cm.sum(1), cm.sum(0)
        rows = []
        for k, c in enumerate(self.classes):
            fp, fn = int(predicted[k] - tp[k]), int(support[k] - tp[k])
            ha = self.pixel_area_m2 / 1e4 if self.pixel_area_m2 else None
            row = {
                "id": c.id, "name": c.name, "color": c.hex, "support": int(support[k]), "predicted": int(predicted[k]),
                "reference_ha": None if ha is None else float(support[k] * ha),
                "predicted_ha": None if ha is None else float(predicted[k] * ha),
                "iou": _ratio(tp[k], tp[k] + fp + fn), "precision": _ratio(tp[k], tp[k] + fp),
                "recall": _ratio(tp[k], tp[k] + fn), "f1": _ratio(2 * tp[k], 2 * tp[k] + fp + fn),
            }
            row.update(users_accuracy=row["precision"], producers_accuracy=row["recall"])
            rows.append(row)
        return rows

    @property
    def mean_iou(self) -> float | None:
        """Mean IoU over the classes present in the reference."""
        ious = [r["iou"] for r in self.per_class if r["support"] > 0]
        return float(np.mean(ious)) if ious else None

    @property
    def mean_iou_classes(self) -> list[str]:
        """Names of the classes the mean IoU is over."""
        return [r["name"] for r in self.per_class if r["support"] > 0]

    @property
    def overall_accuracy(self) -> float | None:
        """Share of pixels classified correctly."""
        total = self.pixels
        return float(np.diag(self.confusion).sum()) / total if total else None

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa."""
        total, po = self.pixels, self.overall_accuracy
        if not total or po is None:
            return None
        pe = float((self.confusion.sum(1).astype(np.float64) * self.confusion.sum(0)).sum()) / total**2
        return (po - pe) / (1 - pe) if pe < 1 else None

    @property
    def frequency_weighted_iou(self) -> float | None:
        """IoU weighted by each class's share of the reference."""
        total = self.pixels
        present = [r for r in self.per_class if r["support"] > 0]
        return float(sum(r["support"] * r["iou"] for r in present) / total) if total else None

    def summary(self) -> dict[str, Any]:
        """The headline numbers (run manifests, STAC, logs)."""
        return {"mean_iou": self.mean_iou, "mean_iou_classes": self.mean_iou_classes,
                "overall_accuracy": self.overall_accuracy, "kappa": self.kappa,
                "frequency_weighted_iou": self.frequency_weighted_iou, "pixels": self.pixels}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (metrics.json)."""
        out: dict[str, Any] = {"classes": self.per_class, **self.summary(), "confusion_matrix": self.confusion.tolist()}
        if self.prediction or self.reference:
            out.update(prediction=self.prediction, reference=self.reference)
        out["unmapped_reference_codes"] = {str(k): v for k, v in sorted(self.unmapped.items())}
        return out


# ----------------------------------------------------------------------------------------------- reading


def _code_lut(ref: EvaluateConfig, class_ids: list[int], max_code: int) -> np.ndarray:
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


def _read_reference_raster(ref: EvaluateConfig, grid: RasterGrid, window: Window) -> tuple[np.ndarray, np.ndarray]:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with rasterio.open(ref.reference) as src:
        nodata = ref.nodata if ref.nodata is not None else src.nodata
        if RasterGrid.of(src) == grid:
            data = src.read(1, window=window)
            valid = data != nodata if nodata is not None else src.read_masks(1, window=window) > 0
            return data, valid
        with WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                       resampling=Resampling.nearest, src_nodata=nodata, nodata=nodata) as vrt:
            data = vrt.read(1, window=window)
            valid = vrt.read_masks(1, window=window) > 0
            return data, valid


def _read_reference_vector(ref: EvaluateConfig, grid: RasterGrid, window: Window) -> tuple[np.ndarray, np.ndarray]:
    import pyogrio
    from rasterio.features import rasterize
    from rasterio.warp import transform_bounds
    from rasterio.windows import bounds as window_bounds
    from rasterio.windows import transform as window_transform

    info = pyogrio.read_info(ref.reference, layer=ref.layer)
    bbox = window_bounds(window, grid.transform)
    if info["crs"] and str(info["crs"]) != str(grid.crs):
        bbox = transform_bounds(grid.crs, info["crs"], *bbox, densify_pts=21)
    frame = pyogrio.read_dataframe(ref.reference, layer=ref.layer, columns=[ref.attribute], bbox=tuple(bbox))
    shape = (int(window.height), int(window.width))
    if frame.empty:
        return np.full(shape, _NO_REF, dtype=np.int64), np.zeros(shape, dtype=bool)
    if frame.crs is not None and frame.crs != grid.crs:
        frame = frame.to_crs(grid.crs)
    values = frame[ref.attribute].to_numpy()
    # rasterio warns NotGeoreferenced, spuriously, when threads make in-memory datasets at once
    # (odc-geo#131); as in vectorize, a process-wide filter since catch_warnings is not thread-safe.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")
    data = rasterize(
        ((geom, int(v)) for geom, v in zip(frame.geometry, values) if geom is not None and v is not None),
        out_shape=shape, transform=window_transform(window, grid.transform), fill=_NO_REF, dtype="int32",
    ).astype(np.int64)
    return data, data != _NO_REF


def block_confusion(prediction: str, ref: EvaluateConfig, grid: RasterGrid, window: Window,
                    classes: ClassMap) -> Metrics:
    """Metrics of one window: its confusion matrix and the reference codes that map to no class."""
    import rasterio

    with rasterio.open(prediction) as pred_ds:
        pred = pred_ds.read(1, window=window)
        # A nodata value is cheaper to test than decoding the dataset mask a second time.
        pred_valid = pred != pred_ds.nodata if pred_ds.nodata is not None else pred_ds.read_masks(1, window=window) > 0
    assert ref.reference is not None
    reader = _read_reference_vector if is_vector(ref.reference) else _read_reference_raster
    codes, ref_valid = reader(ref, grid, window)
    class_ids, n = classes.ids, len(classes)
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
    return Metrics(confusion_matrix(ref_index, pred_index, n, counted), classes, unmapped)


# ----------------------------------------------------------------------------------------------- driver


def _prediction_grid(prediction: Path) -> tuple[RasterGrid, ClassMap]:
    from geoseg.read import open_raster

    with open_raster(prediction) as ds:
        raw = ds.tags().get("GEOSEG_CLASSES")
        if not raw:
            raise InputError(f"{prediction}: no GEOSEG_CLASSES metadata; is it a geoseg land-cover raster?")
        return RasterGrid.of(ds), ClassMap.from_records(json.loads(raw))


def check_reference(ref: EvaluateConfig, grid: RasterGrid) -> None:
    """Refuse a reference that cannot be scored against a prediction on ``grid``, naming the file and the fix.

    A vector reference must have the class attribute (and name its layer when it has several); a reference
    must overlap the prediction at all.
    """
    from rasterio.coords import disjoint_bounds
    from rasterio.warp import transform_bounds

    from geoseg.read import open_raster

    path = ref.reference
    if path is None:
        raise InputError("evaluate.reference: no reference map given")
    west, south, east, north = pred_bounds = grid.bounds
    if not path.exists():
        raise InputError(f"{path}: reference not found")
    if is_vector(path):
        import pyogrio

        try:
            layers = [str(name) for name, _ in pyogrio.list_layers(path)]
            if ref.layer is None and len(layers) > 1:
                raise InputError(f"{path}: has {len(layers)} layers ({', '.join(layers)}); name one with "
                                 "evaluate.layer (geoseg evaluate --layer)")
            if ref.layer is not None and ref.layer not in layers:
                raise InputError(f"{path}: no layer {ref.layer!r}; available: {', '.join(layers)}")
            info = pyogrio.read_info(path, layer=ref.layer)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyogrio raises several types for unreadable files
            raise InputError(f"{path}: not a vector file OGR can read ({str(exc).splitlines()[0]})") from None
        if ref.attribute not in list(info["fields"]):
            raise InputError(f"{path}: no attribute {ref.attribute!r}; available: {', '.join(info['fields'])}"
                             " (set evaluate.attribute)")
        ref_crs, ref_bounds = info["crs"], info["total_bounds"]
    else:
        with open_raster(path) as src:
            if src.crs is None:
                raise InputError(f"{path}: reference has no CRS")
            ref_crs, ref_bounds = src.crs, src.bounds
    if ref_crs is None:
        raise InputError(f"{path}: reference has no CRS")
    in_pred_crs = transform_bounds(ref_crs, grid.crs, *ref_bounds, densify_pts=21)
    if disjoint_bounds(in_pred_crs, pred_bounds) or in_pred_crs[0] >= east or in_pred_crs[2] <= west:
        raise InputError(f"{path}: reference does not overlap the prediction (reference bounds "
                         f"{tuple(round(v, 2) for v in in_pred_crs)}, prediction "
                         f"{tuple(round(v, 2) for v in pred_bounds)})")


def evaluate_iou(prediction: Path, cfg: EvaluateConfig, *, client: Client | None = None,
                 progress: Progress | None = None) -> Metrics:
    """Metrics of a geoseg land-cover raster against ``cfg.reference``, streamed in ``cfg.block`` windows.

    With a Dask ``client`` the blocks run on its cluster; otherwise on two local threads.
    """
    import dask

    from geoseg.cluster import iter_results

    grid, classes = _prediction_grid(Path(prediction))
    check_reference(cfg, grid)
    block = cfg.block
    windows = [w for row in block_rows(grid.height, grid.width, block) for w in row]
    tasks = [dask.delayed(block_confusion, pure=True)(str(prediction), cfg, grid, w, classes) for w in windows]
    total = Metrics.empty(classes, prediction=str(prediction), reference=str(cfg.reference),
                          pixel_area_m2=grid.pixel_area_m2)
    with progress.stage("evaluating", len(tasks), "blocks") if progress else nullcontext() as stage:
        for part in iter_results(tasks, client):
            total = total.merge(part)
            if stage:
                stage.advance()
    if total.pixels == 0:
        raise InputError(f"{cfg.reference}: no pixel is valid in both the prediction and the reference")
    return total

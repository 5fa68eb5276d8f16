"""Evaluation: exact metrics, any reference grid or vector, chunking-invariant numbers, reports."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.features import shapes
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import shape
from sklearn import metrics as skm

from geoseg.config import EvaluateConfig
from geoseg.errors import InputError
from geoseg.evaluate import Metrics, evaluate_iou
from tests.conftest import write_raster


def Reference(path, *, ignore=(), mapping=None, block=2048, **kw):  # noqa: ANN001, ANN003, N802 - the old helper's shape
    """An EvaluateConfig as the tests build them."""
    return EvaluateConfig(reference=path, ignore=list(ignore), mapping=mapping or {}, block=block, **kw)


def scores(prediction, ref, client=None) -> dict:  # noqa: ANN001
    """metrics.json of an evaluation."""
    result = evaluate_iou(prediction, ref, client=client)
    assert isinstance(result, Metrics)
    return result.to_dict()

CLASSES = [{"id": i, "name": f"c{i}", "color": f"#{40 * i:02x}8040"} for i in (1, 2, 3, 4, 5)]
TRANSFORM = from_origin(600000.0, 5300000.0, 10.0, 10.0)


def blocky(rng: np.random.Generator, shape_: tuple[int, int], values: list[int], cell: int) -> np.ndarray:
    """Random labels constant on cell x cell squares (spatially coherent, so resampling matters little)."""
    small = rng.choice(values, size=(shape_[0] // cell + 1, shape_[1] // cell + 1))
    return np.kron(small, np.ones((cell, cell), dtype=small.dtype))[: shape_[0], : shape_[1]]


@pytest.fixture
def pair(tmp_path):  # noqa: ANN001
    rng = np.random.default_rng(42)
    shp = (203, 171)
    ref = blocky(rng, shp, [1, 2, 3, 4, 7, 9], 9).astype("uint8")  # 7 unmapped, 9 ignored
    ref[:15, :] = 0  # reference nodata
    pred = np.where(rng.random(shp) < 0.7, np.where(ref < 6, ref, 2), rng.choice([1, 2, 3, 5], size=shp))
    pred = pred.astype("uint8")
    pred[:, :11] = 255  # prediction nodata
    tags = {"GEOSEG_CLASSES": json.dumps(CLASSES)}
    return (write_raster(tmp_path / "pred.tif", pred, nodata=255, tags=tags),
            write_raster(tmp_path / "ref.tif", ref, nodata=0), pred, ref)


def test_metrics_equal_an_independent_computation(pair):  # noqa: ANN001
    pred_path, ref_path, pred, ref = pair
    report = scores(pred_path, Reference(ref_path, ignore=(9,), block=37))
    keep = (pred != 255) & (ref != 0) & (ref != 9) & (ref != 7)
    y_true, y_pred = ref[keep], pred[keep]
    ids = [c["id"] for c in CLASSES]
    assert report["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=ids).tolist()
    iou = skm.jaccard_score(y_true, y_pred, labels=ids, average=None, zero_division=0)  # every class occurs here
    p, r, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=np.nan)
    for k, row in enumerate(report["classes"]):
        for name, expected in (("iou", iou[k]), ("precision", p[k]), ("recall", r[k]), ("f1", f1[k])):
            if np.isnan(expected):
                assert row[name] is None, (row, name)
            else:
                assert row[name] == pytest.approx(expected, abs=1e-12), (row, name)
        assert row["support"] == support[k]
    present = [k for k in range(len(ids)) if support[k] > 0]
    assert report["classes"][4]["support"] == 0 and report["classes"][4]["iou"] == 0.0  # predicted, not in ref
    assert report["mean_iou"] == pytest.approx(np.mean(iou[present]), abs=1e-12)
    assert report["mean_iou_classes"] == [f"c{ids[k]}" for k in present]
    assert report["overall_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert report["kappa"] == pytest.approx(skm.cohen_kappa_score(y_true, y_pred, labels=ids), abs=1e-12)
    fw = sum(support[k] * iou[k] for k in present) / support.sum()
    assert report["frequency_weighted_iou"] == pytest.approx(fw, abs=1e-12)
    assert report["unmapped_reference_codes"] == {"7": int(((ref == 7) & (pred != 255)).sum())}


def test_class_absent_from_both_maps_has_no_iou(tmp_path):  # noqa: ANN001
    tags = {"GEOSEG_CLASSES": json.dumps(CLASSES)}
    a = np.array([[1, 1, 2, 2]], dtype="uint8")
    pred = write_raster(tmp_path / "p.tif", a, nodata=255, tags=tags)
    ref = write_raster(tmp_path / "r.tif", a, nodata=0)
    report = scores(pred, Reference(ref))
    assert [c["iou"] for c in report["classes"]] == [1.0, 1.0, None, None, None]
    assert report["mean_iou"] == 1.0 and report["mean_iou_classes"] == ["c1", "c2"]


def test_mapping_several_codes_to_one_class(pair):  # noqa: ANN001
    pred_path, ref_path, pred, ref = pair
    report = scores(pred_path, Reference(ref_path, mapping={7: 5, 9: 5}))
    assert report["unmapped_reference_codes"] == {}
    keep = (pred != 255) & (ref != 0)
    assert report["classes"][4]["support"] == int(np.isin(ref[keep], [7, 9]).sum())


def test_chunking_and_workers_do_not_change_the_numbers(pair, client):  # noqa: ANN001
    pred_path, ref_path, _, _ = pair
    base = scores(pred_path, Reference(ref_path, ignore=(9,), block=2048))
    for block in (16, 50, 171):
        assert scores(pred_path, Reference(ref_path, ignore=(9,), block=block)) == base
    assert scores(pred_path, Reference(ref_path, ignore=(9,), block=40), client=client) == base
    parts = [evaluate_iou(pred_path, Reference(ref_path, ignore=(9,), block=b)) for b in (16, 50)]
    assert parts[0].merge(parts[1]).pixels == 2 * base["pixels"]  # merging sums the counts


def test_reference_in_another_crs_and_resolution(pair, tmp_path):  # noqa: ANN001
    pred_path, ref_path, _, ref = pair
    native = scores(pred_path, Reference(ref_path, ignore=(9,)))
    with rasterio.open(ref_path) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height,
                                                               *src.bounds, resolution=6e-5)
        warped = np.zeros((height, width), dtype="uint8")
        reproject(ref, warped, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                  dst_crs="EPSG:4326", resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)
    geo = write_raster(tmp_path / "ref4326.tif", warped, crs="EPSG:4326", transform=transform, nodata=0)
    other = scores(pred_path, Reference(geo, ignore=(9,)))
    # Two nearest-neighbour resamplings move class edges by up to a pixel: on 9 px blocks that is a few %.
    assert other["pixels"] == pytest.approx(native["pixels"], rel=0.03)
    assert other["overall_accuracy"] == pytest.approx(native["overall_accuracy"], abs=0.03)
    for a, b in zip(native["classes"], other["classes"]):
        assert b["support"] == pytest.approx(a["support"], rel=0.08, abs=50)


def test_vector_reference_equals_its_rasterized_twin(pair, tmp_path):  # noqa: ANN001
    pred_path, ref_path, _, ref = pair
    with rasterio.open(ref_path) as src:
        feats = [{"geometry": shape(g), "class": int(v)} for g, v in shapes(ref, mask=ref != 0,
                                                                          transform=src.transform)]
    gdf = gpd.GeoDataFrame(feats, crs="EPSG:32632")
    gdf.to_file(tmp_path / "ref.gpkg")
    raster = scores(pred_path, Reference(ref_path, ignore=(9,), block=64))
    vector = scores(pred_path, Reference(tmp_path / "ref.gpkg", ignore=(9,), block=64))
    for key in ("confusion_matrix", "mean_iou", "kappa", "unmapped_reference_codes"):
        assert vector[key] == raster[key]


def test_reference_problems_are_clear_errors(pair, tmp_path):  # noqa: ANN001
    pred_path, ref_path, _, ref = pair
    far = write_raster(tmp_path / "far.tif", ref, nodata=0, transform=from_origin(100000.0, 1000000.0, 10, 10))
    with pytest.raises(InputError, match="reference does not overlap the prediction"):
        evaluate_iou(pred_path, Reference(far))
    gpd.GeoDataFrame({"code": [1]}, geometry=gpd.points_from_xy([600100.0], [5299900.0]).buffer(50),
                     crs="EPSG:32632").to_file(tmp_path / "v.gpkg")
    with pytest.raises(InputError, match="no attribute 'class'; available: code"):
        evaluate_iou(pred_path, Reference(tmp_path / "v.gpkg"))
    with pytest.raises(InputError, match="evaluate.mapping: 7: 99 is not a class id"):
        evaluate_iou(pred_path, Reference(ref_path, mapping={7: 99}))
    with pytest.raises(InputError, match="no GEOSEG_CLASSES metadata"):
        evaluate_iou(ref_path, Reference(ref_path))


def test_pipeline_stage_writes_reports_and_manifest(tmp_path, client, fcn_checkpoint, sample_scene):  # noqa: ANN001
    from geoseg.pipeline import run_pipeline
    from tests.conftest import pipeline_config

    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16},
                          evaluate={"reference": str(sample_scene.labels), "block": 100})
    result = run_pipeline(cfg, client=client)
    manifest = json.loads(result.manifest.read_text())
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert manifest["metrics"]["mean_iou"] == metrics["mean_iou"] and "evaluate" in manifest["timings_s"]
    for key in ("metrics_json", "metrics_csv", "report", "confusion_png", "iou_png"):
        assert (tmp_path / "o" / manifest["outputs"][key]).exists()
    assert (tmp_path / "o" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mean IoU" in (tmp_path / "o" / "report.md").read_text()
    assert (tmp_path / "o" / "metrics.csv").read_text().startswith("id,name,iou,precision,recall,f1")


def test_boundary_fscore_counts_edges_within_the_tolerance():
    from geoseg.evaluate import boundary_fscore

    ref = np.zeros((40, 40), np.int64)
    ref[:, 20:] = 1  # one vertical edge: columns 19 | 20
    valid = np.ones(ref.shape, bool)
    assert boundary_fscore(ref, ref, valid) == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    shifted = np.zeros_like(ref)
    shifted[:, 22:] = 1  # 2 px off: inside a tolerance of 2, outside one of 1
    assert boundary_fscore(ref, shifted, valid, 2)["f_score"] == 1.0
    assert boundary_fscore(ref, shifted, valid, 1)["f_score"] == 0.0
    noisy = ref.copy()
    noisy[5, 5] = 1  # a speck far from the edge: 3 more edge pixels (it, and its left and upper neighbours)
    got = boundary_fscore(ref, noisy, valid, 2)
    assert got["recall"] == 1.0 and got["precision"] == pytest.approx(40 / 43)
    assert boundary_fscore(ref, noisy, valid & (np.arange(40) != 5)[:, None], 2)["precision"] == 1.0

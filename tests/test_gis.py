"""GIS-native outputs, read back with the real libraries: GDAL's category names and attribute table, the
GeoPackage version and styles, FlatGeobuf and GeoParquet, confidence scale, STAC, the report; and QGIS
itself where it is installed (headless)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.pipeline import run_pipeline
from tests.conftest import pipeline_config


def gdal_tool(name: str) -> str:
    """A GDAL command-line tool (Debian's gdal-bin: GDAL 3.6, what QGIS 3.22 reads with), installed when missing."""
    from tests.debian import Unavailable, ensure

    try:
        ensure(["gdal-bin"], [name], Path("/tmp/geoseg-apt.log"))
    except Unavailable as exc:
        pytest.skip(f"GDAL's own view of the outputs is not checked: {exc}")
    return str(shutil.which(name))


@pytest.fixture(scope="module")
def run(tmp_path_factory, fcn_checkpoint, sample_scene):
    """One run writing every output, shared by the checks."""
    from distributed import Client, LocalCluster

    out = tmp_path_factory.mktemp("gis") / "out"
    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, out, tile={"size": 64, "overlap": 16},
                          write={"confidence": "uint8", "datetime": "2026-11-20T10:31:00Z"},
                          evaluate={"reference": str(sample_scene.labels)})
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        return run_pipeline(cfg, client=client), sample_scene


@pytest.mark.gis
def test_class_names_and_attribute_table_travel_with_the_raster(run, tmp_path):
    result, _ = run
    tif = result.landcover
    aux = tif.with_name(tif.name + ".aux.xml")
    root = ElementTree.parse(aux).getroot()
    names = [c.text or "" for c in root.iter("Category")]
    assert names[1] == "water" and names[5] == "built-up" and names[0] == ""
    rows = [[f.text for f in row.iter("F")] for row in root.iter("Row")]
    with rasterio.open(tif) as src:
        counts = np.bincount(src.read(1).ravel(), minlength=256)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6] and [r[1] for r in rows][0] == "water"
    assert [int(r[6]) for r in rows] == [int(counts[v]) for v in range(1, 7)]
    assert float(rows[0][7]) == pytest.approx(counts[1] * 100 / 1e4)  # 10 m pixels: hectares
    # Copied elsewhere with its sidecar and without the .qml, GDAL still names the classes.
    for name in (tif.name, aux.name):
        shutil.copy(tif.parent / name, tmp_path / name)
    info = json.loads(subprocess.run([gdal_tool("gdalinfo"), "-json", str(tmp_path / tif.name)],
                                     capture_output=True, text=True, check=True).stdout)
    band = info["bands"][0]
    assert band["categories"][1] == "water" and band["colorInterpretation"] == "Palette"
    rat = info.get("rat") or band.get("rat")
    assert rat and [c["name"] for c in rat["fieldDefn"]][:2] == ["Value", "Class"]


def test_confidence_reads_as_probability(run):
    result, _ = run
    with rasterio.open(result.outputs["confidence"]) as src:
        assert src.scales == (pytest.approx(1 / 250),) and src.offsets == (0.0,)
        data = src.read(1)
    probability = data[data != 255] * (1 / 250)
    assert probability.min() >= 1 / 6 - 0.01 and probability.max() <= 1.0
    style = Path(result.outputs["confidence_style"]).read_text()
    assert 'type="singlebandpseudocolor"' in style and 'classificationMax="1"' in style


def test_geopackage_is_version_1_2_with_conformant_times_and_an_sld(run):
    result, _ = run
    con = sqlite3.connect(result.outputs["vector"])
    try:
        assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200  # 1.2, not 1.4
        stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"
        assert all(re.match(stamp, t) for (t,) in con.execute("SELECT last_change FROM gpkg_contents"))
        qml, sld, when = con.execute("SELECT styleQML, styleSLD, update_time FROM layer_styles").fetchone()
    finally:
        con.close()
    assert re.match(stamp, when) and "categorizedSymbol" in qml
    rules = ElementTree.fromstring(sld).findall(".//{http://www.opengis.net/se}Rule")
    assert len(rules) == 6


@pytest.mark.gis
def test_gdal_3_6_opens_the_geopackage_without_a_warning(run):
    result, _ = run
    done = subprocess.run([gdal_tool("ogrinfo"), "-so", "-al", result.outputs["vector"]], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "Warning" not in done.stderr and "ERROR" not in done.stderr, done.stderr
    assert "class_name" in done.stdout


@pytest.mark.parametrize("suffix", [".fgb", ".parquet"])
def test_flatgeobuf_and_geoparquet_carry_the_same_polygons_and_a_style(run, tmp_path, suffix):
    import geopandas as gpd

    from geoseg.config import VectorizeConfig
    from geoseg.vectorize import vectorize_classes

    result, _ = run
    out = tmp_path / f"polygons{suffix}"
    info = vectorize_classes(result.landcover, out, VectorizeConfig(min_area_px=4))
    assert Path(info["style"]) == out.with_suffix(".qml") and "categorizedSymbol" in out.with_suffix(".qml").read_text()
    other = gpd.read_parquet(out) if suffix == ".parquet" else gpd.read_file(out)
    gpkg = gpd.read_file(result.outputs["vector"])
    assert len(other) == len(gpkg) and other.crs == gpkg.crs
    assert other.area.sum() == pytest.approx(gpkg.area.sum())
    assert set(other.columns) >= {"class_id", "class_name", "area_m2", "perimeter_m"}
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        geo = json.loads(pq.read_schema(out).metadata[b"geo"])
        assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["geometry_types"] == ["MultiPolygon"]


def test_stac_item_follows_the_spec(run):
    import pystac
    import shapely
    from shapely.geometry import shape
    from stac_pydantic import Item

    result, scene = run
    data = json.loads((result.output_dir / "item.json").read_text())
    Item.model_validate(data)  # the core Item spec, offline
    item = pystac.Item.from_dict(data)
    assert item.datetime.isoformat().startswith("2026-11-20T10:31:00")
    geom = shape(data["geometry"])
    for part in getattr(geom, "geoms", [geom]):
        assert part.exterior.is_ccw  # RFC 7946: exterior rings counter-clockwise
    assert shapely.is_valid(geom)
    derived = next(link for link in data["links"] if link["rel"] == "derived_from")
    assert not os.path.isabs(derived["href"]) and "://" not in derived["href"]
    assert (result.output_dir / derived["href"]).resolve() == scene.image.resolve()
    assert derived["type"] == "image/tiff; application=geotiff"  # the sample is a plain GeoTIFF, not a COG
    assert data["assets"]["landcover"]["type"].endswith("profile=cloud-optimized")
    assert data["assets"]["confidence"]["raster:bands"][0]["scale"] == pytest.approx(1 / 250)
    assert "categories" in data["assets"]  # the .aux.xml goes with the raster to a catalogue


def test_stac_datetime_from_processing_time_is_said(tmp_path, client, fcn_checkpoint, sample_scene, caplog):
    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16},
                          vectorize={"enabled": False})
    run_pipeline(cfg, client=client)
    assert "no acquisition time" in caplog.text and "write.datetime" in caplog.text
    item = json.loads((tmp_path / "o" / "item.json").read_text())
    assert item["properties"]["geoseg:datetime_source"] == "processing time"


def test_report_names_users_and_producers_accuracy_with_areas(run):
    result, _ = run
    metrics = json.loads(Path(result.outputs["metrics_json"]).read_text())
    row = metrics["classes"][0]
    assert row["users_accuracy"] == row["precision"] and row["producers_accuracy"] == row["recall"]
    assert row["reference_ha"] == pytest.approx(row["support"] * 100 / 1e4)
    report = Path(result.outputs["report"]).read_text()
    assert "user's accuracy (precision)" in report and "producer's accuracy (recall)" in report and "ha" in report
    header = Path(result.outputs["metrics_csv"]).read_text().splitlines()[0]
    assert "users_accuracy" in header and "reference_ha" in header


QGIS_CHECK = r"""
import json, sys
from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer, QgsRaster, QgsPointXY
app = QgsApplication([], False)
app.initQgis()
raster = QgsRasterLayer(sys.argv[1], "landcover")
vector = QgsVectorLayer(sys.argv[2] + "|layername=landcover", "polygons", "ogr")
renderer = raster.renderer()
labels = [c.label for c in renderer.classes()] if hasattr(renderer, "classes") else []
ident = raster.dataProvider().identify(raster.extent().center(), QgsRaster.IdentifyFormatValue).results()
style_default = vector.renderer().type()
print(json.dumps({"valid": [raster.isValid(), vector.isValid()], "renderer": renderer.type(), "labels": labels,
                  "vector_renderer": style_default, "identify": {str(k): v for k, v in ident.items()}}), flush=True)
del renderer, raster, vector
app.exitQgis()
"""


@pytest.mark.gis
def test_qgis_opens_both_outputs_without_their_sidecar_styles(run, tmp_path):
    """Headless PyQGIS (Debian's qgis + python3-qgis, QT_QPA_PLATFORM=offscreen), installed when missing."""
    from tests.debian import Unavailable, ensure

    offscreen = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": ""}
    qgis_python = "/usr/bin/python3"
    try:
        ensure(["qgis", "python3-qgis"], [qgis_python], Path("/tmp/geoseg-apt.log"),
               check=["env", "QT_QPA_PLATFORM=offscreen", "PYTHONPATH=", qgis_python, "-c", "import qgis.core"])
    except Unavailable as exc:
        pytest.skip(f"QGIS's own view is not checked: {exc}")
    result, _ = run
    for name in ("landcover.tif", "landcover.tif.aux.xml", "landcover.gpkg"):  # no .qml
        shutil.copy(result.output_dir / name, tmp_path / name)
    script = tmp_path / "check.py"
    script.write_text(QGIS_CHECK)
    done = subprocess.run([qgis_python, str(script), str(tmp_path / "landcover.tif"), str(tmp_path / "landcover.gpkg")],
                          capture_output=True, text=True, timeout=300, env=offscreen)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["valid"] == [True, True] and seen["renderer"] == "paletted"
    assert "water" in seen["labels"] and seen["vector_renderer"] == "categorizedSymbol"



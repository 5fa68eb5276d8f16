"""Vectorize: exact polygons, chunked == whole raster, seamless minimum mapping unit, GIS-ready GeoPackage."""

from __future__ import annotations

import json
import sqlite3

import geopandas as gpd
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.features import rasterize, shapes
from rasterio.transform import from_origin

from geoseg.config import VectorizeConfig
from geoseg.grid import RasterGrid
from geoseg.vectorize import polygon_features, sieve_block, vectorize_classes
from tests.conftest import write_raster

CLASSES = [{"id": i, "name": f"c{i}", "color": f"#{50 * i:02x}{255 - 40 * i:02x}40"} for i in (1, 2, 3, 4)]
TAGS = {"GEOSEG_CLASSES": json.dumps(CLASSES)}


def labels_raster(tmp_path, data, name="l.tif", **kw):  # noqa: ANN001, ANN003
    return write_raster(tmp_path / name, data.astype("uint8"), nodata=255, tags=TAGS, **kw)


def random_labels(seed: int, shape=(97, 83), cell=5, nodata_frac=0.1) -> np.ndarray:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    small = rng.integers(1, 5, size=(shape[0] // cell + 2, shape[1] // cell + 2))
    data = np.kron(small, np.ones((cell, cell), int))[: shape[0], : shape[1]]
    noise = rng.random(shape) < 0.08
    data[noise] = rng.integers(1, 5, size=noise.sum())
    data[rng.random(shape) < nodata_frac * 0.2] = 255
    data[: shape[0] // 6, : shape[1] // 5] = 255
    return data


GRID = from_origin(1e3, 1e3, 1, 1)


def chunked_polygons(data: np.ndarray, block: int, connectivity: int, tmp_path) -> list:  # noqa: ANN001
    """Polygons as the chunked driver makes them: blocks polygonized, merged row by row, unioned on threads."""
    path = write_raster(tmp_path / "h.tif", data.astype("uint8"), nodata=255, transform=GRID)
    cfg = VectorizeConfig(connectivity=connectivity, block=block)
    out = []
    grid = RasterGrid(CRS.from_epsg(32632), GRID, *data.shape)
    for feats in polygon_features(str(path), cfg, grid, lookahead=3):
        out += list(zip(shapely.from_wkb(feats["wkb"]), feats["class_id"].tolist()))
    return out


def whole_polygons(data: np.ndarray, connectivity: int, transform=GRID) -> list:  # noqa: ANN001
    """One shapes() call over the whole raster (8-connected rings that touch themselves made valid)."""
    return [(shapely.make_valid(shapely.geometry.shape(g)), int(v)) for g, v in
            shapes(data.astype("uint8"), mask=data != 255, connectivity=connectivity, transform=transform)]


def assert_same_polygons(a: list, b: list) -> None:
    assert len(a) == len(b)
    key = lambda item: (item[1], round(item[0].area, 6), item[0].bounds)  # noqa: E731
    for (ga, va), (gb, vb) in zip(sorted(a, key=key), sorted(b, key=key)):
        assert va == vb and ga.area == gb.area
        # The same vertices (no collinear leftovers of block edges), up to ring order and start point.
        assert shapely.equals_exact(shapely.normalize(ga), shapely.normalize(gb), 0), (ga.wkt, gb.wkt)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), block=st.integers(4, 30), cell=st.integers(1, 9),
       connectivity=st.sampled_from([4, 8]), rows=st.integers(5, 70), cols=st.integers(5, 70))
def test_chunked_equals_whole_raster(tmp_path_factory, seed, block, cell, connectivity, rows, cols):  # noqa: ANN001
    data = random_labels(seed, (rows, cols), cell)
    tmp = tmp_path_factory.mktemp("h")
    assert_same_polygons(chunked_polygons(data, block, connectivity, tmp), whole_polygons(data, connectivity))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_holes_multipart_diagonals_and_polygons_over_many_chunks(tmp_path, connectivity):  # noqa: ANN001
    data = np.full((60, 60), 1)
    data[5:55, 5:55] = 2  # a square spanning 9 chunks of 20 ...
    data[20:40, 20:40] = 1  # ... with a hole, itself spanning 4 chunks
    data[28:32, 0:60] = 3  # a stripe across every chunk column
    data[10, 19], data[11, 20] = 4, 4  # diagonal touch across a chunk edge
    data[45, 39], data[44, 40] = 4, 4
    data[50:52, 50:52] = 255
    assert_same_polygons(chunked_polygons(data, 20, connectivity, tmp_path), whole_polygons(data, connectivity))


def test_polygons_rasterize_back_to_the_labels(tmp_path):  # noqa: ANN001
    data = random_labels(7, (120, 90))
    transform = from_origin(350000.0, 6000000.0, 2.5, 2.5)
    src = labels_raster(tmp_path, data, transform=transform)
    out = tmp_path / "v.gpkg"
    info = vectorize_classes(src, out, VectorizeConfig(block=32))
    gdf = gpd.read_file(out, layer="landcover")
    assert len(gdf) == info["features"] and gdf.geometry.is_valid.all()
    back = rasterize(zip(gdf.geometry, gdf.class_id), out_shape=data.shape, transform=transform, fill=255,
                     dtype="uint8")
    assert np.array_equal(back, data)
    assert gdf.crs.to_epsg() == 32632
    assert gdf.area_m2.sum() == pytest.approx((data != 255).sum() * 2.5 * 2.5)
    assert set(gdf.class_name) <= {"c1", "c2", "c3", "c4"}
    assert (gdf.perimeter_m >= 4 * 2.5).all()


def test_geopackage_has_spatial_index_and_qgis_style(tmp_path):  # noqa: ANN001
    src = labels_raster(tmp_path, random_labels(1))
    out = tmp_path / "v.gpkg"
    vectorize_classes(src, out, VectorizeConfig(layer="lc", block=40))
    con = sqlite3.connect(out)
    styles = con.execute("SELECT f_table_name, styleQML, useAsDefault FROM layer_styles").fetchall()
    index = con.execute("SELECT count(*) FROM gpkg_extensions WHERE extension_name = 'gpkg_rtree_index'").fetchone()
    con.close()
    assert styles[0][0] == "lc" and styles[0][2] == 1 and 'attr="class_id"' in styles[0][1] and "c3" in styles[0][1]
    assert index[0] >= 1
    gdf = gpd.read_file(out, layer="lc")
    assert gdf.crs.to_epsg() == 32632 and len(gdf) > 10


def test_simplification_keeps_a_clean_coverage(tmp_path):  # noqa: ANN001
    r, c = np.mgrid[0:120, 0:120]
    data = ((r + 2 * c) // 25) % 4 + 1  # staircase edges, which simplification straightens
    data[(r - 60) ** 2 + (c - 50) ** 2 < 30**2] = 2
    src = labels_raster(tmp_path, data)
    raw = gpd.read_file(vectorize_classes(src, tmp_path / "raw.gpkg", VectorizeConfig(block=32))["path"], layer="landcover")
    simple = gpd.read_file(vectorize_classes(src, tmp_path / "s.gpkg", VectorizeConfig(block=32, simplify=15.0))["path"],
                           layer="landcover")
    assert simple.geometry.is_valid.all() and len(simple) == len(raw)
    assert shapely.get_num_coordinates(simple.geometry.values).sum() < shapely.get_num_coordinates(raw.geometry.values).sum()
    union = shapely.union_all(simple.geometry.values)
    assert simple.area.sum() == pytest.approx(union.area, rel=1e-9)  # no overlaps
    assert abs(simple.area.sum() - raw.area.sum()) / raw.area.sum() < 0.005
    assert union.area == pytest.approx(shapely.union_all(raw.geometry.values).area, rel=0.005)  # no gaps


def test_minimum_mapping_unit_is_seamless_and_removes_small_patches(tmp_path):  # noqa: ANN001
    data = random_labels(11, (90, 110), cell=6)
    valid = data != 255
    whole = sieve_block(data, valid, 6, 4)
    src = labels_raster(tmp_path, data)
    for block in (64, 100):
        out = tmp_path / f"m{block}.gpkg"
        vectorize_classes(src, out, VectorizeConfig(block=block, min_area_px=6))
        gdf = gpd.read_file(out, layer="landcover")
        back = rasterize(zip(gdf.geometry, gdf.class_id), out_shape=data.shape,
                         transform=from_origin(600000.0, 5300000.0, 10.0, 10.0), fill=255, dtype="uint8")
        assert np.array_equal(back, np.where(valid, whole, 255))
    small = [g for g, v in whole_polygons(np.where(valid, whole, 255), 4) if g.area < 6]
    assert len(small) < 0.05 * len(whole_polygons(data, 4))  # only patches without a large neighbour stay


def test_geographic_crs_areas_in_square_metres(tmp_path):  # noqa: ANN001
    data = np.ones((10, 10), dtype=int)
    src = labels_raster(tmp_path, data, crs="EPSG:4326", transform=from_origin(10.0, 50.0, 0.001, 0.001))
    gdf = gpd.read_file(vectorize_classes(src, tmp_path / "g.gpkg")["path"], layer="landcover")
    # 0.01 deg x 0.01 deg at 50 N is about 1113 m x 716 m
    assert gdf.area_m2.sum() == pytest.approx(1113.2 * 715.5, rel=0.01)


def test_other_formats_and_errors(tmp_path):  # noqa: ANN001
    src = labels_raster(tmp_path, random_labels(2, (40, 40)))
    info = vectorize_classes(src, tmp_path / "v.fgb", VectorizeConfig(block=16))
    assert len(gpd.read_file(info["path"])) == info["features"]
    from geoseg.errors import InputError, OutputExistsError

    with pytest.raises(InputError, match="unsupported vector format"):
        vectorize_classes(src, tmp_path / "v.shp")
    with pytest.raises(OutputExistsError):
        vectorize_classes(src, tmp_path / "v.fgb")
    empty = labels_raster(tmp_path, np.full((20, 20), 255), name="e.tif")
    assert len(gpd.read_file(vectorize_classes(empty, tmp_path / "e.gpkg")["path"], layer="landcover")) == 0


def test_dask_workers_give_the_same_layer_as_local_threads(tmp_path, client, monkeypatch):  # noqa: ANN001
    import geoseg.vectorize

    monkeypatch.setattr(geoseg.vectorize, "_SCATTER_BYTES", 0)  # the large-group path: groups scattered first
    src = labels_raster(tmp_path, random_labels(3, (90, 70)))
    local = gpd.read_file(vectorize_classes(src, tmp_path / "local.gpkg", VectorizeConfig(block=16))["path"])
    dist = gpd.read_file(vectorize_classes(src, tmp_path / "dask.gpkg", VectorizeConfig(block=16),
                                           client=client)["path"])
    for gdf in (local, dist):
        gdf[["minx", "miny", "maxx", "maxy"]] = gdf.geometry.bounds
    key = ["class_id", "area_m2", "perimeter_m", "minx", "miny", "maxx", "maxy"]
    local, dist = local.sort_values(key).reset_index(drop=True), dist.sort_values(key).reset_index(drop=True)
    assert len(local) == len(dist) > 20
    assert (local[key + ["class_name"]] == dist[key + ["class_name"]]).all().all()
    assert all(shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), 0)
               for a, b in zip(local.geometry, dist.geometry))


def test_a_mapping_unit_larger_than_the_block_stays_exact(tmp_path):
    """The halo is 2 * unit + 2 whatever the block (it used to be cut to the block, silently)."""
    data = np.ones((40, 400), dtype=np.uint8)
    data[20, 50:350] = 2  # a 300 px line: large for a 200 px unit, so it stays; a block sees it whole only with the halo
    data[5, 10:40] = 3  # a 30 px patch: small, it goes
    src = labels_raster(tmp_path, data)
    out = tmp_path / "u.gpkg"
    vectorize_classes(src, out, VectorizeConfig(block=64, min_area_px=200))
    gdf = gpd.read_file(out, layer="landcover")
    back = rasterize(zip(gdf.geometry, gdf.class_id), out_shape=data.shape,
                     transform=from_origin(600000.0, 5300000.0, 10.0, 10.0), fill=255, dtype="uint8")
    expected = sieve_block(data, np.ones(data.shape, bool), 200, 4)
    assert (expected[20, 50:350] == 2).all() and (expected[5, 10:40] == 1).all()
    assert np.array_equal(back, expected)


def test_a_mapping_unit_too_large_to_read_is_refused(tmp_path):
    from geoseg.errors import ConfigError

    src = labels_raster(tmp_path, np.ones((10, 10), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"vectorize.min_area_px: a minimum mapping unit of 20000 px needs 40002 px"):
        vectorize_classes(src, tmp_path / "x.gpkg", VectorizeConfig(min_area_px=20000))
    assert not (tmp_path / "x.gpkg").exists()

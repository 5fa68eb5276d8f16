"""STAC Items: footprints and bounding boxes as RFC 7946 and the STAC spec want them."""

from __future__ import annotations

from affine import Affine
from rasterio.crs import CRS

from geoseg.grid import RasterGrid
from geoseg.stac import bbox, footprint


def test_a_scene_across_the_antimeridian_is_cut_and_its_bbox_wraps():
    # UTM zone 60N near 179.5 E: 60 km wide, so it reaches past 180
    grid = RasterGrid(CRS.from_epsg(32660), Affine(100, 0, 660000, 0, -100, 6000000), 200, 600)
    geom = footprint(grid)
    assert geom["type"] == "MultiPolygon"
    west, south, east, north = bbox(geom)
    assert west > east and 170 < west < 180 and -180 < east < -170, (west, east)
    assert -180 <= east and west <= 180 and south < north


def test_an_ordinary_scene_keeps_a_plain_bbox():
    grid = RasterGrid(CRS.from_epsg(32632), Affine(10, 0, 600000, 0, -10, 5300000), 100, 100)
    west, south, east, north = bbox(footprint(grid))
    assert west < east and 10 < west < 11 and 47 < south < north < 48



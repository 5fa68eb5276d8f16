"""Polygons finished for writing: pixel to CRS coordinates, area and perimeter, the feature batch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from affine import Affine

from geoseg.grid import RasterGrid

if TYPE_CHECKING:

    pass

log = logging.getLogger("geoseg")


def to_world(pixel: np.ndarray, transform: Affine) -> np.ndarray:
    """Polygons in pixel coordinates mapped through the raster's affine ``transform``."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    world = shapely.transform(pixel, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                                  d * xy[:, 0] + e * xy[:, 1] + f]))
    if e > 0 or a < 0:  # a flipped grid reverses ring orientation; keep polygons valid and oriented
        world = shapely.orient_polygons(world)
    return world


def measures(geoms: np.ndarray, crs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m): in the CRS's metres when projected, else in an equal-area CRS."""
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(crs)
    if crs.is_projected:
        factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
        return shapely.area(geoms) * factor**2, shapely.length(geoms) * factor
    # World cylindrical equal-area (EPSG:6933): areas are right; perimeters are close near the data.
    to_eq = Transformer.from_crs(crs, "EPSG:6933", always_xy=True)
    eq = shapely.transform(geoms, lambda xy: np.column_stack(to_eq.transform(xy[:, 0], xy[:, 1])))
    return shapely.area(eq), shapely.length(eq)


def features(pixel: np.ndarray, values: Any, grid: RasterGrid) -> dict:
    """Polygons in pixel coordinates, finished for writing: CRS coordinates (WKB), class id, area, perimeter.

    Done where the polygons are made (on the workers), so the writer only writes.
    """
    world = to_world(np.asarray(pixel, dtype=object), grid.transform)
    area, perimeter = measures(world, grid.crs)
    return {"wkb": shapely.to_wkb(world), "class_id": np.asarray(values, dtype=np.int32), "area_m2": area,
            "perimeter_m": perimeter}


def add_measures(gdf):  # noqa: ANN001, ANN201
    """``area_m2`` and ``perimeter_m`` columns (:func:`measures`) of a GeoDataFrame."""
    gdf["area_m2"], gdf["perimeter_m"] = measures(np.asarray(gdf.geometry.values), gdf.crs)
    return gdf

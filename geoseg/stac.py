"""STAC Items describing a run's outputs, so catalogues and GIS tools can pick them up.

One Item per scene (``item.json`` beside the outputs): footprint and bbox in WGS 84, the projection of the
grid (projection extension), the land-cover raster with its class table (classification extension v2),
and the polygons, confidence raster, metrics and run manifest as further assets. Hrefs are relative, so an
output folder can be moved or synced to object storage as it is. The Item is built and serialised by
pystac (its STAC version, datetime format and field order); geoseg computes the geometry and the values.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shapely.geometry import shape

from geoseg._version import __version__
from geoseg.classes import ClassMap
from geoseg.grid import RasterGrid
from geoseg.read import Raster

log = logging.getLogger("geoseg")

EXTENSIONS = [
    "https://stac-extensions.github.io/classification/v2.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/processing/v1.2.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
]
GEOTIFF = "image/tiff; application=geotiff"
COG = GEOTIFF + "; profile=cloud-optimized"

_MEDIA = {
    ".tif": COG,  # what geoseg writes
    ".parquet": "application/vnd.apache.parquet",
    ".xml": "application/xml",
    ".gpkg": "application/geopackage+sqlite3",
    ".fgb": "application/vnd.flatgeobuf",
    ".json": "application/json",
    ".csv": "text/csv",
    ".md": "text/markdown",
    ".png": "image/png",
    ".qml": "application/xml",
}
_ROLES = {"landcover": ["data"], "confidence": ["data", "quality"], "vector": ["data"], "tiles": ["data"],
          "scores": ["data"]}


def footprint(grid: RasterGrid, points_per_side: int = 16) -> dict:
    """The raster's outline in WGS 84 as a GeoJSON polygon, densified so projected edges stay true."""
    from rasterio.transform import xy
    from rasterio.warp import transform_geom

    h, w, n = grid.height, grid.width, points_per_side
    edge = [(0, c * w / n) for c in range(n)] + [(r * h / n, w) for r in range(n)]
    edge += [(h, w - c * w / n) for c in range(n)] + [(h - r * h / n, 0) for r in range(n)]
    xs, ys = xy(grid.transform, [r for r, _ in edge], [c for _, c in edge], offset="ul")
    ring = [[float(x), float(y)] for x, y in zip(xs, ys)]
    # Cut at the antimeridian (RFC 7946 3.1.9): a scene across it becomes a MultiPolygon of two parts.
    geom = transform_geom(grid.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                          precision=7, antimeridian_cutting=True)
    # RFC 7946 3.1.6: exterior rings counter-clockwise (the image's top-left, right, down walk is clockwise).
    from shapely.geometry import mapping
    from shapely.geometry.polygon import orient

    oriented = shape(geom)
    parts = [orient(p, sign=1.0) for p in getattr(oriented, "geoms", [oriented])]
    out = mapping(parts[0] if len(parts) == 1 else type(oriented)(parts))
    return {"type": out["type"], "coordinates": _lists(out["coordinates"])}


def _lists(coords: Any) -> Any:
    """Nested tuples of coordinates as nested lists (JSON arrays, as transform_geom gives them)."""
    return [_lists(c) for c in coords] if isinstance(coords, (tuple, list)) and not isinstance(coords[0], float) \
        else [float(v) for v in coords]


def media_type(path: Path) -> str:
    """The media type of a raster file: a GeoTIFF says cloud-optimized only when its layout is COG."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            if src.driver != "GTiff":
                return f"image/x.{src.driver.lower()}"
            return COG if src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" else GEOTIFF
    except rasterio.errors.RasterioIOError:
        return "application/octet-stream"


def bbox(geom: dict) -> list[float]:
    """The STAC bbox of a WGS 84 footprint; across the antimeridian west > east (RFC 7946 5.2)."""
    shp = shape(geom)
    parts = list(getattr(shp, "geoms", [shp]))
    west, south, east, north = shp.bounds
    eastern = [p.bounds for p in parts if p.bounds[2] >= 180.0 - 1e-9]
    western = [p.bounds for p in parts if p.bounds[0] <= -180.0 + 1e-9]
    if eastern and western and len(parts) > 1:
        west, east = min(b[0] for b in eastern), max(b[2] for b in western)
    return [max(west, -180.0), south, min(east, 180.0), north]


def _slug(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "-", name).strip("-").lower() or "class"


def class_table(classes: ClassMap, nodata: int) -> list[dict]:
    """``classification:classes`` for the land-cover raster, nodata included."""
    table = [{"value": c.id, "name": _slug(c.name), "title": c.name, "description": c.name,
              "color_hint": c.hex.lstrip("#").upper()} for c in classes]
    return table + [{"value": nodata, "name": "nodata", "title": "no data", "description": "no valid input",
                     "nodata": True}]


def acquisition_time(path: Path) -> str | None:
    """The scene's TIFFTAG_DATETIME as ISO 8601 (UTC assumed), if the input carries one."""
    import rasterio

    with rasterio.open(path) as src:
        raw = src.tags().get("TIFFTAG_DATETIME")
    try:
        return datetime.strptime(raw, "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc).isoformat() if raw else None
    except ValueError:
        return None


def stac_item(item_id: str, raster: Raster, outputs: dict[str, str], classes: ClassMap, nodata: int, *,
              metrics: dict | None = None, source: dict | None = None, staged: Path | None = None,
              when: str | None = None, confidence_scale: float | None = None,
              domain_warnings: list[str] | None = None) -> dict[str, Any]:
    """A STAC Item for one scene's outputs (``outputs``: asset key -> path inside the scene's folder).

    ``staged``: where the outputs are while the item is written (their folder by default).

    The acquisition time: ``when`` (``write.datetime``), else the source STAC Item's when the scene came from
    one, else the input's TIFFTAG_DATETIME, else the processing time with a warning
    (``geoseg:datetime_source`` says which). ``confidence_scale`` is the confidence raster's value scale.
    """
    grid = raster.grid
    geom = footprint(grid)
    now = datetime.now(timezone.utc).isoformat()
    origin = "write.datetime"
    if not when:
        when, origin = (source or {}).get("datetime"), "source item"
    if not when:
        when, origin = acquisition_time(raster.path), "input TIFFTAG_DATETIME"
    if not when:
        when, origin = now, "processing time"
        log.warning("%s: no acquisition time (no TIFFTAG_DATETIME); the STAC Item's datetime is the processing "
                    "time: set write.datetime to the scene's", raster.path.name)
    t = grid.transform
    props: dict[str, Any] = {
        "datetime": when, "created": now, "geoseg:datetime_source": origin,
        "proj:code": f"EPSG:{grid.crs.to_epsg()}" if grid.crs.to_epsg() else None,
        "proj:wkt2": None if grid.crs.to_epsg() else grid.crs.to_wkt(),
        "proj:shape": [grid.height, grid.width], "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "processing:software": {"geoseg": __version__}, "processing:lineage": "land-cover segmentation",
    }
    if domain_warnings:
        props["geoseg:domain_warnings"] = list(domain_warnings)
    if metrics:
        props["geoseg:metrics"] = {k: metrics[k] for k in ("mean_iou", "overall_accuracy", "kappa") if k in metrics}
    import pystac
    from pystac.utils import str_to_datetime

    item = pystac.Item(item_id, geom, bbox(geom), str_to_datetime(when),
                       {k: v for k, v in props.items() if v is not None and k != "datetime"},
                       stac_extensions=list(EXTENSIONS))
    for key, path in outputs.items():
        p = Path(path)
        if (staged / p.name if staged else p).is_dir() or key in ("manifest", "stac_item"):
            continue
        extra: dict[str, Any] = {}
        if key == "landcover":
            extra["classification:classes"] = class_table(classes, nodata)
            extra["raster:bands"] = [{"nodata": nodata, "data_type": "uint8", "sampling": "area"}]
        if key == "confidence" and confidence_scale is not None:
            extra["raster:bands"] = [{"scale": confidence_scale, "offset": 0.0, "unit": "probability",
                                      "nodata": 255 if confidence_scale != 1.0 else -1.0,
                                      "data_type": "uint8" if confidence_scale != 1.0 else "float32"}]
        item.add_asset(key, pystac.Asset(f"./{p.name}", key.replace("_", " "),
                                         media_type=_MEDIA.get(p.suffix.lower(), "application/octet-stream"),
                                         roles=_ROLES.get(key, ["metadata"]), extra_fields=extra))
    item.add_asset("manifest", pystac.Asset("./run.json", "geoseg run manifest", media_type="application/json",
                                            roles=["metadata"]))
    # Relative, like the assets: the folder can move or sync with its inputs. A source item keeps its href.
    folder = (staged.parent if staged else Path(next(iter(outputs.values()))).parent) if outputs else Path.cwd()
    if source and source.get("href"):
        item.add_link(pystac.Link("derived_from", source["href"], media_type="application/geo+json"))
    else:
        item.add_link(pystac.Link("derived_from", os.path.relpath(raster.path.absolute(), folder.absolute()),
                                  media_type=media_type(raster.path)))
    return item.to_dict(include_self_link=False, transform_hrefs=False)

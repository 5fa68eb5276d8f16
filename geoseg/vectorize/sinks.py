"""Where feature batches go, appended batch by batch.

An OGR layer (GeoPackage, FlatGeobuf) through pyogrio's raw writer, or GeoParquet through pyarrow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

from geoseg.errors import InputError
from geoseg.grid import RasterGrid

if TYPE_CHECKING:

    pass

log = logging.getLogger("geoseg")


#: GeoPackage version written: 1.2 opens without warnings in GDAL 3.6 / QGIS 3.22 (GDAL 3.12 writes 1.4).
GPKG_VERSION = "1.2"
_COLUMNS = ["class_id", "class_name", "area_m2", "perimeter_m"]


class _OgrSink:
    """Batches into an OGR layer through pyogrio's raw writer (the workers' WKB as it is, no GeoDataFrame)."""

    def __init__(self, path: Path, driver: str, layer: str, grid: RasterGrid) -> None:
        self.path, self.driver, self.layer, self.crs = path, driver, layer, grid.crs.to_wkt()
        self.written = False

    def write(self, feats: dict) -> None:
        from pyogrio.raw import write as write_raw

        options = {"VERSION": GPKG_VERSION} if self.driver == "GPKG" and not self.written else None
        write_raw(self.path, feats["wkb"], [feats[c] for c in _COLUMNS], _COLUMNS, layer=self.layer,
                  driver=self.driver, geometry_type="MultiPolygon", promote_to_multi=True, crs=self.crs,
                  encoding="UTF-8", append=self.written, dataset_options=options)
        self.written = True

    def close(self) -> None:
        """Nothing held open."""


class _ParquetSink:
    """Batches as row groups of a GeoParquet 1.1 file: MultiPolygon WKB, PROJJSON CRS (streamed: flat memory)."""

    def __init__(self, path: Path, grid: RasterGrid) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path.name}: GeoParquet output needs pyarrow: pip install 'geoseg[parquet]'") from None
        geo = {"version": "1.1.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["MultiPolygon"],
                                        "crs": _projjson(grid.crs)}}}
        schema = pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area_m2", pa.float64()),
                            ("perimeter_m", pa.float64()), ("geometry", pa.binary())],
                           metadata={b"geo": json.dumps(geo).encode()})
        self.writer = pq.ParquetWriter(str(path), schema)
        self.schema = schema
        self.written = False

    def write(self, feats: dict) -> None:
        import pyarrow as pa

        geoms = shapely.from_wkb(feats["wkb"])
        single = shapely.get_type_id(geoms) == 3  # polygons become one-part multipolygons, as in the GeoPackage
        if single.any():
            geoms[single] = shapely.multipolygons(geoms[single], indices=np.arange(int(single.sum())))
        table = pa.table({"class_id": pa.array(feats["class_id"], pa.int32()),
                          "class_name": pa.array(feats["class_name"].tolist(), pa.string()),
                          "area_m2": pa.array(feats["area_m2"], pa.float64()),
                          "perimeter_m": pa.array(feats["perimeter_m"], pa.float64()),
                          "geometry": pa.array(shapely.to_wkb(geoms).tolist(), pa.binary())}, schema=self.schema)
        self.writer.write_table(table)
        self.written = True

    def close(self) -> None:
        """Finish the file."""
        self.writer.close()


def _projjson(crs: Any) -> Any:
    from pyproj import CRS

    return CRS.from_user_input(crs).to_json_dict()

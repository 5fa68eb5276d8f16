"""Write stage: the land-cover GeoTIFF on exactly the input grid, as a Cloud-Optimized GeoTIFF.

Blocks arrive in any order and are written into a tiled temporary GeoTIFF; closing converts it with
GDAL's COG driver (internal tiles, compression, nearest/mode overviews, colour table kept) and renames
it into place, so a crash never leaves a file that looks finished.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geoseg._io import atomic_path, check_overwrite, remove, temporary_name
from geoseg.classes import ClassMap
from geoseg.errors import OutputWriteError
from geoseg.grid import RasterGrid


class RasterWriter:
    """Streams windows of a single-band raster on the input grid into a COG at ``path``."""

    def __init__(
        self,
        path: Path,
        grid: RasterGrid,
        dtype: str,
        nodata: float | None,
        *,
        compress: str = "deflate",
        overviews: bool = True,
        resampling: str = "nearest",
        overwrite: bool = False,
        colormap: dict | None = None,
        tags: dict | None = None,
        description: str | None = None,
    ) -> None:
        self.path = Path(path)
        check_overwrite(self.path, overwrite)
        self.overwrite = overwrite
        self.compress, self.overviews, self.resampling = compress, overviews, resampling
        self._scratch = temporary_name(self.path.with_name(self.path.name + ".scratch"))
        profile = {
            "driver": "GTiff",
            "width": grid.width,
            "height": grid.height,
            "count": 1,
            "dtype": dtype,
            "crs": grid.crs,
            "transform": grid.transform,
            "nodata": nodata,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            # Scratch only: the COG conversion compresses for real. The fastest deflate keeps the scratch
            # small for huge scenes and costs the client (which shares the cores with the workers) little.
            "compress": "deflate",
            "zlevel": 1,
            "BIGTIFF": "IF_SAFER",
        }
        self._ds = rasterio.open(self._scratch, "w", **{k: v for k, v in profile.items() if v is not None})
        if colormap:
            self._ds.write_colormap(1, colormap)
        if tags:
            self._ds.update_tags(**tags)
        if description:
            self._ds.set_band_description(1, description)

    def write(self, window: Window, data: np.ndarray) -> None:
        """Write one block."""
        with self._naming_the_file():
            self._ds.write(data, 1, window=window)

    @contextmanager
    def _naming_the_file(self) -> Iterator[None]:
        """GDAL's write errors (a full disk) name no file: say which output could not be written."""
        try:
            yield
        except OSError as exc:
            if getattr(exc, "filename", None):
                raise
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise OutputWriteError(f"{self.path}: cannot write ({detail}); is the disk full?") from None

    def close(self) -> Path:
        """Finish the COG and move it into place."""
        with self._naming_the_file():
            self._ds.close()
        try:
            with atomic_path(self.path, overwrite=self.overwrite) as tmp:
                options = {
                    "COMPRESS": self.compress.upper() if self.compress != "none" else "NONE",
                    "BLOCKSIZE": 512,
                    "BIGTIFF": "IF_SAFER",
                    "OVERVIEWS": "AUTO" if self.overviews else "NONE",
                    "OVERVIEW_RESAMPLING": self.resampling.upper(),
                    "NUM_THREADS": "ALL_CPUS",
                }
                if self.compress in ("deflate", "zstd", "lzw"):
                    options["PREDICTOR"] = "NO"
                with self._naming_the_file():
                    rasterio.shutil.copy(self._scratch, tmp, driver="COG", **options)
        finally:
            remove(self._scratch)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        if not self._ds.closed:
            self._ds.close()
        remove(self._scratch)


def landcover_writer(path: Path, grid: RasterGrid, classes: ClassMap, nodata: int, *, compress: str,
                     overviews: bool, overwrite: bool = False) -> RasterWriter:
    """Writer for the class-id raster: uint8, colour table, class names in the metadata."""
    names = {str(c.id): c.name for c in classes}
    return RasterWriter(
        path, grid, "uint8", nodata,
        compress=compress, overviews=overviews, resampling="mode", overwrite=overwrite,
        colormap=classes.colormap(nodata),
        tags={"GEOSEG_CLASSES": json.dumps(classes.to_records()), "CLASS_NAMES": json.dumps(names)},
        description="land cover class",
    )


def confidence_writer(path: Path, grid: RasterGrid, dtype: str, *, compress: str, overviews: bool,
                      overwrite: bool = False) -> RasterWriter:
    """Writer for the top-class probability: uint8 0-250 (255 nodata) or float16-valued float32."""
    # GeoTIFF has no float16 sample type in GDAL < 3.11; float16 values are stored in float32.
    out_dtype, nodata = ("uint8", 255) if dtype == "uint8" else ("float32", -1.0)
    scale = "probability x 250" if dtype == "uint8" else "probability"
    return RasterWriter(
        path, grid, out_dtype, nodata,
        compress=compress, overviews=overviews, resampling="average", overwrite=overwrite,
        tags={"CONFIDENCE_SCALE": scale}, description="top class probability",
    )


def encode_confidence(conf: np.ndarray, valid: np.ndarray, dtype: str) -> np.ndarray:
    """Confidence block in its output encoding."""
    if dtype == "uint8":
        return np.where(valid, np.round(conf * 250), 255).astype(np.uint8)
    return np.where(valid, conf.astype(np.float16).astype(np.float32), -1.0).astype(np.float32)


def write_qgis_style(path: Path, classes: ClassMap, nodata: int) -> Path:
    """QGIS paletted style beside the raster (``landcover.qml``): QGIS loads it with the layer."""
    entries = "\n".join(
        f'          <paletteEntry value="{c.id}" color="{c.hex}" alpha="255" '
        f'label="{escape(c.name, {chr(34): "&quot;"})}"/>'
        for c in classes
    )
    qml = f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.34" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" nodataColor="">
      <rasterTransparency/>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
  <!-- nodata value {nodata} is transparent -->
</qgis>
"""
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(qml)
    return path

"""Write stage: the land-cover GeoTIFF on exactly the input grid, as a Cloud-Optimized GeoTIFF.

Blocks arrive in any order and are written into a tiled temporary GeoTIFF; closing converts it with
GDAL's COG driver (internal tiles, compression, nearest/mode overviews, colour table kept) and renames
it into place, so a crash never leaves a file that looks finished. :class:`SceneWriter` is the stage:
every raster output of a scene (land cover with its QGIS style and category table, the optional
confidence with its style) from the stitched blocks.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geoseg import _faults
from geoseg._io import atomic_path, check_overwrite, remove, temporary_name
from geoseg.classes import ClassMap
from geoseg.config import WriteConfig
from geoseg.errors import OutputWriteError
from geoseg.grid import RasterGrid

LANDCOVER = "landcover.tif"
CONFIDENCE = "confidence.tif"


def output_names(cfg: WriteConfig) -> list[str]:
    """Names of the files :class:`SceneWriter` puts in its folder under ``cfg``."""
    names = [LANDCOVER, LANDCOVER + ".aux.xml", Path(LANDCOVER).with_suffix(".qml").name]
    if cfg.confidence != "none":
        names += [CONFIDENCE, Path(CONFIDENCE).with_suffix(".qml").name]
    return names


#: GDAL 3.10 (rasterio 1.4.4) loses blocks of a deflate-tiled GeoTIFF written window by window when the
#: windows cut its tiles and other threads of the process use GDAL meanwhile (other writers, or readers:
#: the in-process workers of a local run): whole chunks or 256 px squares came back nodata, seen in
#: batches with two scenes in flight, and in a script with 2-4 threads (1 file in ~15). A tile rewritten
#: in part is what goes wrong: nothing was lost with tiles the size of the windows, with an uncompressed
#: scratch or with GDAL's default cache. So the scratch is tiled like the scene's chunks where GeoTIFF
#: allows (:func:`scratch_block`), and its writes take turns across the process, which alone kept writers
#: beside writers safe but not beside readers (other chunk sizes). The COG conversion reads a closed scratch.
_SCRATCH_WRITES = threading.Lock()


def scratch_block(chunk: int) -> int:
    """Tile size of the scratch GeoTIFF for blocks of ``chunk`` px: the chunk itself where GeoTIFF allows.

    GeoTIFF tiles are multiples of 16 px; with tiles the size of the blocks each block writes whole tiles.
    Other chunk sizes get 256.
    """
    return chunk if chunk % 16 == 0 else 256


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
        scale: float | None = None,
        histogram: bool = False,
        creation_options: dict[str, str] | None = None,
        block: int = 256,
    ) -> None:
        self.path = Path(path)
        self.counts = np.zeros(256, dtype=np.int64) if histogram else None
        """Pixels per value (uint8 rasters with ``histogram``): the attribute table's counts."""
        check_overwrite(self.path, overwrite)
        self.overwrite = overwrite
        self.compress, self.overviews, self.resampling = compress, overviews, resampling
        self.creation_options = dict(creation_options or {})
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
            "blockxsize": block,  # the size of the blocks written: see scratch_block
            "blockysize": block,
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
        if scale is not None:
            # GDAL's own scale/offset (GDAL_METADATA tag): QGIS, gdalinfo and zonal statistics read them.
            self._ds.scales, self._ds.offsets = (scale,), (0.0,)

    def write(self, window: Window, data: np.ndarray) -> None:
        """Write one block."""
        with self._naming_the_file(), _SCRATCH_WRITES:
            self._ds.write(data, 1, window=window)
        if self.counts is not None:
            self.counts += np.bincount(data.ravel(), minlength=256)

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
        with self._naming_the_file(), _SCRATCH_WRITES:
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
                options.update(self.creation_options)
                with self._naming_the_file():
                    rasterio.shutil.copy(self._scratch, tmp, driver="COG", **options)
        finally:
            remove(self._scratch)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        if not self._ds.closed:
            with _SCRATCH_WRITES:
                self._ds.close()
        remove(self._scratch)


def landcover_writer(path: Path, grid: RasterGrid, classes: ClassMap, nodata: int, *, compress: str,
                     overviews: bool, overwrite: bool = False,
                     creation_options: dict[str, str] | None = None, block: int = 256) -> RasterWriter:
    """Writer for the class-id raster: uint8, colour table, class names in the metadata."""
    names = {str(c.id): c.name for c in classes}
    return RasterWriter(
        path, grid, "uint8", nodata,
        compress=compress, overviews=overviews, resampling="mode", overwrite=overwrite,
        colormap=classes.colormap(nodata),
        tags={"GEOSEG_CLASSES": json.dumps(classes.to_records()), "CLASS_NAMES": json.dumps(names)},
        description="land cover class", histogram=True, creation_options=creation_options, block=block,
    )


def confidence_writer(path: Path, grid: RasterGrid, dtype: str, *, compress: str, overviews: bool,
                      overwrite: bool = False, creation_options: dict[str, str] | None = None,
                      block: int = 256) -> RasterWriter:
    """Writer for the top-class probability: uint8 0-250 (255 nodata) or float16-valued float32."""
    # GeoTIFF has no float16 sample type in GDAL < 3.11; float16 values are stored in float32.
    out_dtype, nodata = ("uint8", 255) if dtype == "uint8" else ("float32", -1.0)
    scale = CONFIDENCE_SCALE if dtype == "uint8" else 1.0
    return RasterWriter(
        path, grid, out_dtype, nodata,
        compress=compress, overviews=overviews, resampling="average", overwrite=overwrite,
        tags={"CONFIDENCE_SCALE": "value x scale = probability"}, description="top class probability",
        scale=scale, creation_options=creation_options, block=block,
    )


#: uint8 confidence: probabilities 0-1 stored as 0-250 (255 is nodata); the one home of the encoding.
CONFIDENCE_LEVELS = 250
#: GDAL's scale of the uint8 confidence: stored value x scale = probability.
CONFIDENCE_SCALE = 1 / CONFIDENCE_LEVELS


def confidence_scale(dtype: str) -> float | None:
    """GDAL scale of ``write.confidence`` = ``dtype`` (``None`` when no confidence is written)."""
    return None if dtype == "none" else CONFIDENCE_SCALE if dtype == "uint8" else 1.0


def encode_confidence(conf: np.ndarray, valid: np.ndarray, dtype: str) -> np.ndarray:
    """Confidence block in its output encoding."""
    if dtype == "uint8":
        return np.where(valid, np.round(conf * CONFIDENCE_LEVELS), 255).astype(np.uint8)
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


def write_categories(tif: Path, classes: ClassMap, nodata: int, counts: np.ndarray,
                     pixel_area_m2: float | None) -> Path:
    """GDAL's own class metadata for a class-id GeoTIFF: category names and a raster attribute table.

    Written as the PAM sidecar ``<name>.aux.xml`` (GDAL's mechanism for what GeoTIFF cannot hold): gdalinfo
    lists the categories and the table (value, class name, colour, pixel count, area), and QGIS shows the
    names without a style file. The colour table stays in the TIFF itself.
    """
    by_id = {c.id: c for c in classes}
    top = max([*by_id, nodata])
    names = "".join(f"      <Category>{escape(by_id[v].name) if v in by_id else ''}</Category>\n"
                    for v in range(top + 1))
    # GDAL field types: 0 integer, 1 real, 2 string; usages: 5 min-max (the value), 2 name, 6-9 RGBA,
    # 1 pixel count, 0 generic.
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9),
              ("Count", 0, 1), ("Area_ha", 1, 0)]
    defs = "".join(f'      <FieldDefn index="{k}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>\n'
                   for k, (n, t, u) in enumerate(fields))
    rows = []
    for k, c in enumerate(classes):
        area = "" if pixel_area_m2 is None else f"{counts[c.id] * pixel_area_m2 / 1e4:.4f}"
        cells = [str(c.id), escape(c.name), *map(str, c.color), "255", str(int(counts[c.id])), area]
        rows.append(f'      <Row index="{k}">' + "".join(f"<F>{v}</F>" for v in cells) + "</Row>\n")
    xml = (f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>\n{names}    </CategoryNames>\n'
           f'    <GDALRasterAttributeTable tableType="thematic">\n{defs}{"".join(rows)}'
           "    </GDALRasterAttributeTable>\n  </PAMRasterBand>\n</PAMDataset>\n")
    path = tif.with_name(tif.name + ".aux.xml")
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(xml)
    return path


def write_confidence_style(path: Path, dtype: str) -> Path:
    """QGIS style for confidence.tif: grey (uncertain) to green (certain), in probability units."""
    top = 1.0
    stops = [(0.0, "#3b3b3b"), (0.5, "#9e9e9e"), (0.8, "#a6d96a"), (1.0, "#1a9641")]
    items = "\n".join(f'            <item alpha="255" value="{v * top:g}" color="{c}" label="{v:.0%}"/>'
                      for v, c in stops)
    qml = f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" classificationMin="0" classificationMax="{top:g}">
      <rastershader>
        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" minimumValue="0"
                         maximumValue="{top:g}">
{items}
        </colorrampshader>
      </rastershader>
    </rasterrenderer>
  </pipe>
  <!-- {dtype}: values are probabilities once GDAL's scale is applied (QGIS applies it) -->
</qgis>
"""
    with atomic_path(Path(path), overwrite=True) as tmp:
        tmp.write_text(qml)
    return Path(path)


class SceneWriter:
    """The raster outputs of one scene in ``folder``, streamed from its stitched blocks.

    :meth:`write` takes each block's window, class ids and top-class probability (any order); :meth:`close`
    finishes the land-cover COG, its QGIS style and category table (``.aux.xml``) and the confidence COG
    and style where ``cfg.confidence`` asks, and returns them by output name; :meth:`abort` drops them.
    ``chunk``: the size of the blocks (the scene's chunks), which the scratch is tiled to (:func:`scratch_block`).
    """

    def __init__(self, folder: Path, grid: RasterGrid, classes: ClassMap, cfg: WriteConfig, *,
                 chunk: int | None = None) -> None:
        self.cfg, self.grid, self.classes = cfg, grid, classes
        block = 256 if chunk is None else scratch_block(chunk)
        self.landcover = folder / LANDCOVER
        self.confidence = folder / CONFIDENCE if cfg.confidence != "none" else None
        co = cfg.creation_options
        self._writers = [landcover_writer(self.landcover, grid, classes, cfg.nodata, compress=cfg.compress,
                                          overviews=cfg.overviews, creation_options=co, block=block)]
        if self.confidence is not None:
            try:
                self._writers.append(confidence_writer(self.confidence, grid, cfg.confidence, compress=cfg.compress,
                                                       overviews=cfg.overviews, creation_options=co,
                                                       block=block))
            except BaseException:
                self._writers[0].abort()
                raise

    def write(self, window: Window, labels: np.ndarray, confidence: np.ndarray) -> None:
        """One block: class ids (``cfg.nodata`` where invalid) and the top-class probability."""
        encoded = None
        if self.confidence is not None:
            encoded = encode_confidence(confidence, labels != self.cfg.nodata, self.cfg.confidence)
        self.write_encoded(window, labels, encoded)

    def write_encoded(self, window: Window, labels: np.ndarray, confidence: np.ndarray | None) -> None:
        """One block whose confidence is in its output encoding already (:func:`encode_confidence`)."""
        self._writers[0].write(window, labels)
        if len(self._writers) > 1:
            assert confidence is not None
            self._writers[1].write(window, confidence)

    def close(self) -> dict[str, str]:
        """Finish every output; their paths by output name (landcover, qgis_style, categories, confidence...)."""
        cfg, lc = self.cfg, self._writers[0]
        out = {"landcover": str(lc.close())}
        _faults.point("write")
        out["qgis_style"] = str(write_qgis_style(self.landcover.with_suffix(".qml"), self.classes, cfg.nodata))
        assert lc.counts is not None
        out["categories"] = str(write_categories(self.landcover, self.classes, cfg.nodata, lc.counts,
                                                 self.grid.pixel_area_m2))
        if self.confidence is not None:
            out["confidence"] = str(self._writers[1].close())
            out["confidence_style"] = str(write_confidence_style(self.confidence.with_suffix(".qml"),
                                                                 cfg.confidence))
        return out

    def abort(self) -> None:
        """Drop what was written (the files :meth:`close` has not finished yet)."""
        for w in self._writers:
            w.abort()

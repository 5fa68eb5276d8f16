"""Read stage: open the input raster, check it can be segmented, and read windows with a validity mask.

:func:`read_raster` returns a :class:`Raster`: the input's :class:`~geoseg.grid.RasterGrid` plus what a
reader needs (bands in model order, nodata), and :meth:`Raster.read` reads any window of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from geoseg.config import ReadConfig
from geoseg.errors import InputError, RasterNotFoundError
from geoseg.grid import RasterGrid
from geoseg.models import ModelSpec


@dataclass(frozen=True)
class Raster:
    """An input raster as the later stages see it: where it is, its grid, and how to read it."""

    path: Path
    grid: RasterGrid
    count: int
    dtype: str
    bands: tuple[int, ...]
    """Selected 1-based band indexes, in model order."""
    nodata: float | None
    """Nodata value of the validity mask (the config's or the raster's own)."""
    nodata_override: bool = False
    """Validity from ``nodata`` alone (``read.nodata`` was set), not from the dataset's masks."""
    band_names: tuple[str | None, ...] = ()
    scales: tuple[tuple[float, float], ...] | None = None
    """(scale, offset) per selected band when ``read.scale_offset: apply``: the model sees physical values."""

    @property
    def store_dtype(self) -> str:
        """The tile store's dtype: the raster's, or float32 when scale/offset are applied."""
        return "float32" if self.scales else self.dtype

    @property
    def height(self) -> int:
        """Rows."""
        return self.grid.height

    @property
    def width(self) -> int:
        """Columns."""
        return self.grid.width

    def read(self, src: rasterio.DatasetReader, window: Window | None) -> tuple[np.ndarray, np.ndarray]:
        """``(data, valid)`` of ``window`` from the open dataset ``src`` (see :func:`read_window`)."""
        data, valid = read_window(src, window, self.bands, self.nodata if self.nodata_override else None)
        if self.scales:
            scale = np.array([s for s, _ in self.scales], dtype=np.float32)[:, None, None]
            offset = np.array([o for _, o in self.scales], dtype=np.float32)[:, None, None]
            data = data.astype(np.float32) * scale + offset
        return data, valid


def open_raster(path: Path) -> rasterio.DatasetReader:
    """Open a raster, turning every failure into a one-line InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise RasterNotFoundError(f"{path}: raster not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a raster file")
    if path.suffix.lower() == ".vrt":
        _check_vrt_sources(path)
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        detail = str(exc).split("\n")[0]
        raise InputError(f"{path}: not a raster GDAL can read ({detail})") from None


def _check_vrt_sources(path: Path) -> None:
    """Name a VRT's missing source file (GDAL reads such a VRT as zeros or a bare 'read failed')."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError):
        return  # not XML: GDAL says what it is
    for node in root.iter("SourceFilename"):
        name = (node.text or "").strip()
        if not name or name.startswith("/vsi") or "://" in name:
            continue
        source = path.parent / name if node.get("relativeToVRT") == "1" else Path(name)
        if not source.exists():
            raise InputError(f"{path}: source file missing: {source} (named in the VRT); restore it or rebuild "
                             "the VRT (gdalbuildvrt)")


def unreadable(path: Path, window: Window, exc: Exception) -> InputError:
    """The one-line error for pixels that cannot be read: a valid header over broken or missing tiles."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    (r0, r1), (c0, c1) = window.toranges()
    return InputError(f"{path}: cannot read pixels in rows {int(r0)}-{int(r1)}, columns {int(c0)}-{int(c1)}: file "
                      f"corrupt or truncated? ({detail})")


def read_raster(path: Path, cfg: ReadConfig, model: ModelSpec) -> Raster:
    """Validate the input raster against the config and the model; return its :class:`Raster`."""
    with open_raster(path) as src:
        if src.transform == Affine.identity() and (src.gcps[0] or src.rpcs):
            kind, flag = ("ground control points", "") if src.gcps[0] else ("RPCs", " -rpc")
            raise InputError(f"{path}: has {kind} but no geotransform; warp it onto a map grid first, e.g. "
                             f"gdalwarp{flag} -r bilinear {path.name} {path.stem}_warped.tif")
        if src.crs is None:
            raise InputError(f"{path}: has no CRS; set one first, e.g. rio edit-info --crs EPSG:32632 {path.name}")
        t = src.transform
        if t.b != 0 or t.d != 0:
            raise InputError(
                f"{path}: rotated or sheared geotransform is not supported; warp it north-up first (gdalwarp)"
            )
        if t == Affine.identity():
            raise InputError(f"{path}: has no geotransform (pixel grid is not georeferenced)")
        if np.dtype(src.dtypes[0]).kind not in "uif":
            raise InputError(f"{path}: data type {src.dtypes[0]} is not supported (need integer or float bands)")
        bands = tuple(cfg.bands) if cfg.bands else tuple(b.index for b in model.bands)
        if max(bands) > src.count:
            key = "read.bands" if cfg.bands else "the model's bands"
            raise InputError(f"{path}: has {src.count} bands but {key} asks for band {max(bands)}")
        if len(bands) != model.in_channels:
            raise InputError(
                f"{path}: read.bands selects {len(bands)} bands but the model expects {model.in_channels} "
                f"({', '.join(model.band_names)})"
            )
        _check_band_order(path, src.descriptions, bands, model, explicit=cfg.bands is not None)
        scales = tuple((float(src.scales[b - 1]), float(src.offsets[b - 1])) for b in bands)
        scaled = any(s != (1.0, 0.0) for s in scales)
        if scaled and cfg.scale_offset == "refuse":
            first = next(s for s in scales if s != (1.0, 0.0))
            raise InputError(f"{path}: its bands carry scale/offset metadata (scale {first[0]:g}, offset "
                             f"{first[1]:g}); set read.scale_offset: apply to feed the model physical values, or "
                             "read.scale_offset: ignore to feed the stored values (what geoseg train reads)")
        return Raster(
            path=Path(path),
            grid=RasterGrid.of(src),
            count=src.count,
            dtype=src.dtypes[0],
            bands=bands,
            nodata=cfg.nodata if cfg.nodata is not None else src.nodata,
            nodata_override=cfg.nodata is not None,
            band_names=tuple(src.descriptions[b - 1] for b in bands),
            scales=scales if scaled and cfg.scale_offset == "apply" else None,
        )


def _check_band_order(path: Path, descriptions: tuple, bands: tuple[int, ...], model: ModelSpec,
                      explicit: bool) -> None:
    """Refuse bands whose names show they are the model's bands in another order, and say the fix."""
    want = [name.lower() for name in model.band_names]
    names = {str(d).lower(): i + 1 for i, d in enumerate(descriptions) if d}
    have = [str(descriptions[b - 1]).lower() if descriptions[b - 1] else None for b in bands]
    if explicit or have == want or not set(want) <= set(names):
        return
    fix = [names[n] for n in want]
    raise InputError(
        f"{path}: band names ({', '.join(str(h) for h in have)}) are not the model's bands in order "
        f"({', '.join(want)}); set read.bands: {fix}"
    )


def read_window(
    src: rasterio.DatasetReader, window: Window | None, bands: tuple[int, ...], nodata_override: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``bands`` in ``window``; return ``(data, valid)`` where a pixel is invalid if any band is.

    Validity comes from the dataset masks (nodata, alpha, internal mask) unless ``nodata_override`` is set;
    NaN and infinity are always invalid.
    """
    data = src.read(list(bands), window=window)
    if nodata_override is not None:
        if np.isnan(nodata_override):
            valid = ~np.isnan(data).any(axis=0)
        else:
            valid = ~(data == nodata_override).any(axis=0)
    else:
        valid = (src.read_masks(list(bands), window=window) > 0).all(axis=0)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return data, valid

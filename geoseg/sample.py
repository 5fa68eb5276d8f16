"""Synthetic but realistic sample scenes: a multispectral image and its land-cover reference map.

Every pixel is a pure function of its global (row, col) and the seed (hash-based value noise), so the
scene is written window by window and a 20000 x 20000 scene never sits in memory; the result does not
depend on the window size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from geoseg._io import atomic_path
from geoseg.grid import block_rows

#: Class ids of the reference map (0 is nodata).
CLASSES = [
    {"id": 1, "name": "water", "color": "#1f78b4"},
    {"id": 2, "name": "forest", "color": "#33a02c"},
    {"id": 3, "name": "grassland", "color": "#b2df8a"},
    {"id": 4, "name": "cropland", "color": "#ffd92f"},
    {"id": 5, "name": "built-up", "color": "#e31a1c"},
    {"id": 6, "name": "bare soil", "color": "#a6761d"},
]
BANDS = ["blue", "green", "red", "nir"]
NODATA = 0

# Mean surface reflectance x 10000 per class (blue, green, red, nir): water absorbs NIR, vegetation
# reflects it, built-up and bare soil are bright and flat.
_SPECTRA = np.array(
    [
        [0, 0, 0, 0],
        [520, 640, 420, 220],
        [300, 560, 310, 3200],
        [460, 820, 560, 2700],
        [520, 900, 720, 2300],
        [1150, 1180, 1240, 1550],
        [1250, 1520, 1900, 2450],
    ],
    dtype=np.float32,
)
_ROAD = np.array([820, 860, 900, 1000], dtype=np.float32)


def _hash(*parts: np.ndarray | int) -> np.ndarray:
    """SplitMix64-style hash of integer arrays to uniform floats in [0, 1)."""
    with np.errstate(over="ignore"):
        h: np.ndarray = np.asarray(np.uint64(0x9E3779B97F4A7C15))
        for k, p in enumerate(parts):
            salt = np.uint64(0x632BE59BD9B4E019 * (k + 1) & (2**64 - 1))
            h = h ^ (np.asarray(p).astype(np.int64).astype(np.uint64) + salt)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return np.asarray((h >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def _value_noise(rows: np.ndarray, cols: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1) on a lattice of spacing ``scale`` pixels, evaluated on a window grid."""
    y, x = rows / scale, cols / scale
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - iy, x - ix
    sy, sx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    gy, gx = iy[:, None], ix[None, :]
    v00, v01 = _hash(seed, gy, gx), _hash(seed, gy, gx + 1)
    v10, v11 = _hash(seed, gy + 1, gx), _hash(seed, gy + 1, gx + 1)
    top = v00 + (v01 - v00) * sx[None, :]
    bottom = v10 + (v11 - v10) * sx[None, :]
    return (top + (bottom - top) * sy[:, None]).astype(np.float32)


def _fbm(rows: np.ndarray, cols: np.ndarray, scales: tuple[float, ...], seed: int) -> np.ndarray:
    total = np.zeros((len(rows), len(cols)), dtype=np.float32)
    weight = 0.0
    for k, s in enumerate(scales):
        a = 0.5**k
        total += a * _value_noise(rows, cols, s, seed * 7919 + k * 104729)
        weight += a
    return total / weight


def labels_window(window: Window, width: int, height: int, seed: int) -> np.ndarray:
    """Land-cover class ids (uint8, 0 = nodata) for a window of the scene."""
    r0, c0 = int(window.row_off), int(window.col_off)
    rows = np.arange(r0, r0 + int(window.height), dtype=np.float64)
    cols = np.arange(c0, c0 + int(window.width), dtype=np.float64)
    R, C = rows[:, None], cols[None, :]

    natural = _fbm(rows, cols, (160, 80, 40), seed + 3)
    labels = np.where(natural > 0.5, 2, 3).astype(np.uint8)  # forest / grassland
    labels[_fbm(rows, cols, (70, 35), seed + 4) > 0.74] = 6  # bare soil patches

    # Cropland: rectangular parcels, rows of parcels shifted so edges do not line up.
    agri = _fbm(rows, cols, (420, 210), seed + 5) > 0.52
    ph = 64
    prow = np.floor(R / ph)
    pw = 48 + np.floor(_hash(seed + 6, prow) * 64)
    pcol = np.floor((C + _hash(seed + 7, prow) * 200) / pw)
    kind = _hash(seed + 8, prow, pcol)
    parcel = np.where(kind < 0.72, 4, np.where(kind < 0.88, 3, 6)).astype(np.uint8)
    labels = np.where(agri, parcel, labels)

    # Built-up areas with a street grid.
    urban = _fbm(rows, cols, (600, 300, 150), seed + 9)
    labels[urban > 0.66] = 5

    # Lakes and a meandering river every 2500 rows.
    lakes = _fbm(rows, cols, (380, 190, 95), seed + 10) < 0.26
    phase = _hash(seed + 11, 0) * 2 * np.pi
    centre = 900 + 140 * np.sin(C / 310.0 + phase) + 40 * np.sin(C / 77.0)
    dist = np.abs(((R - centre + 1250) % 2500) - 1250)
    river = dist < 6 + 4 * _value_noise(rows, cols, 50, seed + 12)
    labels[lakes | river] = 1
    labels[_nodata_area(R, C, width, height)] = NODATA
    return labels


def _nodata_area(R: np.ndarray, C: np.ndarray, width: int, height: int) -> np.ndarray:
    """A swath edge: the scene's top-left corner holds no data."""
    return (R / max(height, 1) + C / max(width, 1)) < 0.18


def _roads(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return ((rows[:, None] % 56) < 3) | ((cols[None, :] % 64) < 3)


def image_window(labels: np.ndarray, window: Window, seed: int) -> np.ndarray:
    """Reflectance-like uint16 bands (4, h, w) for a window, from its class ids."""
    r0, c0 = int(window.row_off), int(window.col_off)
    rows = np.arange(r0, r0 + int(window.height), dtype=np.float64)
    cols = np.arange(c0, c0 + int(window.width), dtype=np.float64)
    base = _SPECTRA[labels].transpose(2, 0, 1).copy()
    road = (labels == 5) & _roads(rows, cols)
    base[:, road] = _ROAD[:, None]
    # Parcels differ in crop stage: scale red/NIR per parcel.
    texture = 0.86 + 0.28 * _fbm(rows, cols, (12, 6, 3), seed + 20)
    stage = 0.8 + 0.4 * _fbm(rows, cols, (90,), seed + 21)
    img = base * texture[None]
    img[3] *= np.where(labels == 4, stage, 1.0)
    img[2] *= np.where(labels == 4, 2.0 - stage, 1.0)
    R, C = rows[:, None], cols[None, :]
    for b in range(4):
        u1 = _hash(seed + 30 + b, R, C)
        u2 = _hash(seed + 40 + b, R, C)
        img[b] += (u1 + u2 - 1.0).astype(np.float32) * 120.0
    img = np.clip(img, 1, 65535).astype(np.uint16)
    img[:, labels == NODATA] = NODATA
    return img


@dataclass(frozen=True)
class SamplePaths:
    """The two rasters of a sample scene."""

    image: Path
    labels: Path


def make_sample(
    out_dir: str | Path,
    size: int = 1024,
    seed: int = 0,
    *,
    width: int | None = None,
    crs: str = "EPSG:32631",
    resolution: float = 10.0,
    origin: tuple[float, float] = (500000.0, 5000000.0),
    block: int = 1024,
    overwrite: bool = False,
) -> SamplePaths:
    """Write ``scene.tif`` (4 x uint16, nodata 0) and ``labels.tif`` (uint8, nodata 0) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    height, width = size, width or size
    transform = from_origin(origin[0], origin[1], resolution, resolution)
    common = {"driver": "GTiff", "width": width, "height": height, "crs": CRS.from_user_input(crs),
              "transform": transform, "tiled": True, "blockxsize": 256, "blockysize": 256,
              "compress": "deflate", "nodata": NODATA, "BIGTIFF": "IF_SAFER"}
    paths = SamplePaths(out / "scene.tif", out / "labels.tif")
    from geoseg.classes import ClassMap

    cmap = ClassMap.from_records(CLASSES)
    with atomic_path(paths.image, overwrite) as img_tmp, atomic_path(paths.labels, overwrite) as lab_tmp:
        with rasterio.open(img_tmp, "w", count=4, dtype="uint16", **common) as img_ds, \
                rasterio.open(lab_tmp, "w", count=1, dtype="uint8", **common) as lab_ds:
            for b, name in enumerate(BANDS, start=1):
                img_ds.set_band_description(b, name)
            img_ds.update_tags(GEOSEG_SAMPLE_SEED=str(seed))
            lab_ds.write_colormap(1, cmap.colormap(NODATA))
            lab_ds.update_tags(GEOSEG_CLASSES=__import__("json").dumps(CLASSES))
            for win in (w for row in block_rows(height, width, block) for w in row):
                labels = labels_window(win, width, height, seed)
                lab_ds.write(labels, 1, window=win)
                img_ds.write(image_window(labels, win, seed), window=win)
    return paths

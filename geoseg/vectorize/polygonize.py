"""Polygons of one block, on a worker.

The exact minimum mapping unit (a sieve with a halo), then :func:`rasterio.features.shapes` in pixel
coordinates: interior polygons leave finished, border pieces as WKB for the merge.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geoseg.config import VectorizeConfig
from geoseg.errors import ConfigError
from geoseg.grid import RasterGrid
from geoseg.vectorize.attributes import features

if TYPE_CHECKING:

    pass

log = logging.getLogger("geoseg")


#: Widest window a block may read (block plus halo on both sides): 32768^2 uint8 is 1 GiB per task.
MAX_READ = 32768


def min_area_pixels(cfg: VectorizeConfig, grid: RasterGrid) -> int:
    """The minimum mapping unit in pixels: the larger of ``min_area_px`` and ``min_area_m2`` on this grid."""
    px = cfg.min_area_px
    if cfg.min_area_m2 > 0:
        if not grid.crs.is_projected:
            raise ConfigError("vectorize.min_area_m2: needs a projected CRS; use vectorize.min_area_px")
        factor = grid.crs.linear_units_factor[1]
        px = max(px, int(np.ceil(cfg.min_area_m2 / (grid.pixel_area * factor**2))))
    return px


def sieve_halo(min_area: int, block: int) -> int:
    """Context a block needs for an exact minimum mapping unit: ``2 * min_area + 2`` pixels, or 0 without one.

    Too large a unit for the block is refused rather than clipped (a clipped halo would change the result).
    """
    if min_area <= 1:
        return 0
    halo = 2 * min_area + 2
    if block + 2 * halo > MAX_READ:
        raise ConfigError(f"vectorize.min_area_px: a minimum mapping unit of {min_area} px needs {halo} px of "
                          f"context around each block, more than a task may read ({MAX_READ} px); use at most "
                          f"{(MAX_READ - block) // 4 - 1} px or a smaller vectorize.block")
    return halo



def sieve_block(data: np.ndarray, valid: np.ndarray, min_area: int, connectivity: int) -> np.ndarray:
    """Replace patches smaller than ``min_area`` pixels by the most common class on their outer edge.

    A single pass with a local rule (deviating from GDAL's iterative ``sieve``, which merges into the
    largest neighbour polygon: how large a neighbour is depends on how much of it a block sees, so that
    rule cannot be made seamless block by block). With a halo of ``2 * min_area + 2`` pixels every block
    decides exactly as a whole-raster pass would.
    """
    from scipy import ndimage

    if min_area <= 1:
        return data
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels = np.zeros(data.shape, dtype=np.int64)
    offset = 0
    for value in np.unique(data[valid]):
        lab, n = ndimage.label((data == value) & valid, structure=structure)
        labels[lab > 0] = lab[lab > 0] + offset
        offset += n
    if offset == 0:
        return data
    sizes = np.bincount(labels.ravel(), minlength=offset + 1)
    small = (sizes < min_area) & (np.arange(offset + 1) > 0)
    is_small = small[labels]
    if not is_small.any():
        return data
    # Votes: (small patch label, class of a 4-neighbour pixel that belongs to a large patch).
    n_values = int(data.max()) + 1
    votes = np.zeros((offset + 1) * n_values, dtype=np.int64)
    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        src = (slice(max(dr, 0), data.shape[0] + min(dr, 0)), slice(max(dc, 0), data.shape[1] + min(dc, 0)))
        dst = (slice(max(-dr, 0), data.shape[0] + min(-dr, 0)), slice(max(-dc, 0), data.shape[1] + min(-dc, 0)))
        here, there = labels[dst], labels[src]
        pick = is_small[dst] & valid[src] & ~is_small[src] & (there > 0)
        np.add.at(votes, here[pick] * n_values + data[src][pick].astype(np.int64), 1)
    table = votes.reshape(offset + 1, n_values)
    winner = table.argmax(1)
    has_vote = table.max(1) > 0
    out = data.copy()
    replace = is_small & has_vote[labels]
    out[replace] = winner[labels[replace]].astype(data.dtype)
    return out


def _read_block(path: str, window: Window, halo: int, min_area: int,
                connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    import rasterio
    from rasterio.enums import MaskFlags

    with rasterio.open(path) as src:
        r0, c0 = int(window.row_off) - halo, int(window.col_off) - halo
        r1, c1 = int(window.row_off + window.height) + halo, int(window.col_off + window.width) + halo
        rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, src.height), min(c1, src.width)
        ext = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
        data = src.read(1, window=ext)
        if src.mask_flag_enums[0] == [MaskFlags.nodata]:
            valid = data != src.nodata  # what GDAL's mask would say, without decoding the block again
        else:
            valid = src.read_masks(1, window=ext) > 0
    if not halo:
        return data, valid
    data = sieve_block(data, valid, min_area, connectivity)
    tr, tc = int(window.row_off) - rr0, int(window.col_off) - cc0
    core = (slice(tr, tr + int(window.height)), slice(tc, tc + int(window.width)))
    return data[core], valid[core]


def _polygons(found: list[tuple[dict, float]]) -> np.ndarray:
    """Shapely polygons of ``shapes()`` GeoJSON, built in bulk.

    ``shapely.geometry.shape`` walks every vertex in Python; one array of all the vertices and two
    vectorized constructors (rings, then polygons, the first ring of each being its shell) take a third of
    the time of the whole block.
    """
    coords: list = []
    ring_sizes, ring_owner = [], []
    for k, (geom, _) in enumerate(found):
        for ring in geom["coordinates"]:
            coords.extend(ring)
            ring_sizes.append(len(ring))
            ring_owner.append(k)
    rings = shapely.linearrings(np.array(coords, dtype=np.float64),
                                indices=np.repeat(np.arange(len(ring_sizes)), ring_sizes))
    return shapely.polygons(rings, indices=np.array(ring_owner))


def polygonize_block(path: str, window: Window, min_area: int, cfg: VectorizeConfig,
                     grid: RasterGrid) -> tuple[dict, list]:
    """Polygons of one block: ``(features, border)``.

    ``features`` holds the polygons inside the block, finished (:func:`features`); ``border`` the
    ``(wkb, class_id)`` of those touching an inner block edge, in pixel coordinates, to be merged.
    """
    from rasterio.features import shapes

    halo = sieve_halo(min_area, cfg.block)
    data, valid = _read_block(path, window, halo, min_area, cfg.connectivity)
    n_rows, n_cols = grid.height, grid.width
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    # rasterio warns NotGeoreferenced on the first block's identity transform (pixel coordinates on purpose)
    # and, spuriously, when threads make in-memory datasets at once (odc-geo#131). catch_warnings is not
    # thread-safe, so the filter is process-wide, for rasterio.features only.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")
    found = list(shapes(data, mask=valid, connectivity=cfg.connectivity, transform=Affine.translation(c0, r0)))
    if not found:
        return features(np.empty(0, dtype=object), [], grid), []
    polys = _polygons(found)
    values = np.array([int(v) for _, v in found])
    bad = ~shapely.is_valid(polys)
    if bad.any():  # 8-connected pixels give rings that touch themselves (OGC-invalid)
        polys[bad] = shapely.make_valid(polys[bad])
    minx, miny, maxx, maxy = shapely.bounds(polys).T
    touches = (((minx == c0) & (c0 > 0)) | ((maxx == c1) & (c1 < n_cols)) | ((miny == r0) & (r0 > 0))
               | ((maxy == r1) & (r1 < n_rows)))
    border = list(zip(shapely.to_wkb(polys[touches]).tolist(), values[touches].tolist()))
    return features(polys[~touches], values[~touches], grid), border

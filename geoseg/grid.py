"""Pure geometry: the raster grid, the tile grid over it, chunk windows and blend weights.

Vocabulary (pixels, rasterio's ``Window`` terms): a *tile* is the ``size`` x ``size`` window fed to the
model; neighbouring tiles share ``overlap`` pixels and start every ``stride = size - overlap`` pixels. Each
tile owns a *core*: the cores of all tiles partition the scene, and a tile is inferred only when its core
holds a valid pixel. A *chunk* groups ``chunk_tiles`` x ``chunk_tiles`` tiles; it is one Dask task and one
Zarr chunk of the scratch stores, and owns the regular window ``chunk_window(i, j)`` of the output. Its
tiles' union (``chunk_extent``) reaches past that window; what lies outside is handed to the neighbours
(:mod:`geoseg.segment.accumulate`). Every position is a function of the scene size and the tile settings
only, never of the chunking or the workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window


def block_rows(height: int, width: int, block: int) -> list[list[Window]]:
    """A ``height`` x ``width`` raster's ``block``-pixel windows, row by row (the last ones cut by the edge).

    The one block grid of the stages that read or write a raster in blocks (vectorize, evaluate, the sample).
    """
    return [[Window(c0, r0, min(block, width - c0), min(block, height - r0)) for c0 in range(0, width, block)]
            for r0 in range(0, height, block)]


@dataclass(frozen=True)
class RasterGrid:
    """Where a raster's pixels lie: CRS, affine transform and size. The one grid value every stage shares."""

    crs: CRS
    transform: Affine
    height: int
    width: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return west, south, east, north

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in CRS units squared."""
        t = self.transform
        return abs(t.a * t.e - t.b * t.d)

    @property
    def pixel_area_m2(self) -> float:
        """Area of one pixel in square metres.

        Exact in a projected CRS; in a geographic one, at the scene's centre latitude (WGS 84 metres per degree).
        """
        crs = self.crs
        if crs.is_projected:
            return self.pixel_area * crs.linear_units_factor[1] ** 2
        lat = math.radians(self.transform.f + self.transform.e * self.height / 2)
        per_deg_lon = 111412.84 * math.cos(lat) - 93.5 * math.cos(3 * lat)
        per_deg_lat = 111132.92 - 559.82 * math.cos(2 * lat) + 1.175 * math.cos(4 * lat)
        return self.pixel_area * per_deg_lon * per_deg_lat

    @classmethod
    def of(cls, dataset: object) -> RasterGrid:
        """The grid of an open rasterio dataset."""
        return cls(dataset.crs, dataset.transform, int(dataset.height), int(dataset.width))  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Tile:
    """One model window in scene pixels (may reach past the scene) and the core it owns (inside the scene)."""

    window: Window
    core: Window


@dataclass(frozen=True)
class _Axis:
    """Tile and chunk positions along one axis of ``length`` pixels."""

    origins: tuple[int, ...]
    """Start of each tile (the first may be negative: context comes from reflect padding)."""
    cores: tuple[tuple[int, int], ...]
    """[start, stop) of each tile's core; together they partition the axis."""
    chunk: int
    """Chunk side in pixels (regular: chunk g owns [g * chunk, (g + 1) * chunk))."""
    groups: tuple[tuple[int, int], ...]
    """[first, stop) tile indexes of each chunk; a chunk may hold none."""


@lru_cache(maxsize=64)
def _axis(length: int, size: int, overlap: int, chunk_tiles: int) -> _Axis:
    """Tiles inside the scene: tile k starts at ``k * stride``, the last one is moved back to end at the edge.

    That is ``ceil((length - overlap) / stride)`` tiles, as many as the peers infer (an origin-anchored grid
    with a halo before the first tile needs ``ceil(length / stride)``: 100 instead of 81 at 4096^2 for 512/64).
    A scene shorter than a tile gets one tile, padded by reflection. Tile k's core runs from ``k * stride +
    halo`` to the next core (the first from 0, the last to the edge), so the cores partition the scene.
    Chunk g owns ``[g * chunk, (g + 1) * chunk)`` and infers tiles ``g * chunk_tiles`` to ``(g + 1) *
    chunk_tiles - 1``; a last sliver chunk may hold no tile of its own.
    """
    stride, halo = size - overlap, overlap // 2
    if length <= size:
        origins: tuple[int, ...] = (0,)
    else:
        n = math.ceil((length - overlap) / stride)
        origins = (*(k * stride for k in range(n - 1)), length - size)
    bounds = [0, *(k * stride + halo for k in range(1, len(origins))), length]
    cores = tuple(zip(bounds[:-1], bounds[1:]))
    chunk = stride * chunk_tiles
    n_chunks = max(1, math.ceil(length / chunk))
    n = len(origins)
    groups = tuple((min(g * chunk_tiles, n), min((g + 1) * chunk_tiles, n)) for g in range(n_chunks))
    return _Axis(origins, cores, chunk, groups)


@dataclass(frozen=True)
class TileGrid:
    """Tile grid over a ``height`` x ``width`` scene."""

    height: int
    width: int
    size: int
    overlap: int
    chunk_tiles: int

    @property
    def stride(self) -> int:
        """Pixels between the starts of neighbouring tiles."""
        return self.size - self.overlap

    @property
    def halo(self) -> int:
        """Context each tile sees beyond its core, on each side (half the overlap)."""
        return self.overlap // 2

    @cached_property
    def _rows(self) -> _Axis:
        return _axis(self.height, self.size, self.overlap, self.chunk_tiles)

    @cached_property
    def _cols(self) -> _Axis:
        return _axis(self.width, self.size, self.overlap, self.chunk_tiles)

    @property
    def chunk(self) -> int:
        """Chunk side in pixels: the Zarr chunk of the scratch stores."""
        return self._rows.chunk

    @property
    def chunks_shape(self) -> tuple[int, int]:
        """Number of chunks along (rows, cols)."""
        return len(self._rows.groups), len(self._cols.groups)

    @property
    def tiles_shape(self) -> tuple[int, int]:
        """Number of tiles along (rows, cols)."""
        return len(self._rows.origins), len(self._cols.origins)

    def chunk_window(self, i: int, j: int) -> Window:
        """Window of the output that chunk ``(i, j)`` owns, clipped to the scene."""
        c = self.chunk
        r0, c0 = i * c, j * c
        return Window(c0, r0, min(c, self.width - c0), min(c, self.height - r0))

    def chunk_windows(self) -> Iterator[tuple[tuple[int, int], Window]]:
        """Every chunk index with its window, row by row."""
        ny, nx = self.chunks_shape
        for i in range(ny):
            for j in range(nx):
                yield (i, j), self.chunk_window(i, j)

    def tiles_of(self, i: int, j: int) -> list[Tile]:
        """The tiles chunk ``(i, j)`` infers, row by row."""
        rows, cols = self._rows, self._cols
        out = []
        for a in range(*rows.groups[i]):
            for b in range(*cols.groups[j]):
                (r0, r1), (c0, c1) = rows.cores[a], cols.cores[b]
                out.append(Tile(Window(cols.origins[b], rows.origins[a], self.size, self.size),
                                Window(c0, r0, c1 - c0, r1 - r0)))
        return out

    def tiles_per_chunk(self) -> np.ndarray:
        """Number of tiles in each chunk, shape :attr:`chunks_shape` (the work of its inference task)."""
        rows = np.array([b - a for a, b in self._rows.groups])
        cols = np.array([b - a for a, b in self._cols.groups])
        return np.outer(rows, cols)

    def chunk_extent(self, i: int, j: int) -> Window | None:
        """Union of chunk ``(i, j)``'s tile windows (what its task reads; may reach past the scene), or None."""
        rows, cols = self._rows, self._cols
        (a0, a1), (b0, b1) = rows.groups[i], cols.groups[j]
        if a0 >= a1 or b0 >= b1:
            return None
        r0, c0 = min(rows.origins[a0:a1]), min(cols.origins[b0:b1])
        r1, c1 = max(rows.origins[a0:a1]) + self.size, max(cols.origins[b0:b1]) + self.size
        return Window(c0, r0, c1 - c0, r1 - r0)

    def clip(self, window: Window) -> Window:
        """``window`` cut to the scene (its rows and columns inside ``[0, height) x [0, width)``)."""
        r0, c0 = max(int(window.row_off), 0), max(int(window.col_off), 0)
        r1 = min(int(window.row_off + window.height), self.height)
        c1 = min(int(window.col_off + window.width), self.width)
        return Window(c0, r0, max(c1 - c0, 0), max(r1 - r0, 0))

    def neighbours(self, i: int, j: int) -> list[tuple[int, int]]:
        """The chunks around chunk ``(i, j)`` (up to 8): their tiles may reach into its window and back."""
        ny, nx = self.chunks_shape
        return [(a, b) for a in range(max(i - 1, 0), min(i + 2, ny)) for b in range(max(j - 1, 0), min(j + 2, nx))
                if (a, b) != (i, j)]


def relative(inner: Window, outer: Window) -> tuple[slice, slice]:
    """Row and column slices of ``inner`` within ``outer`` (both in scene pixels)."""
    r0, c0 = int(inner.row_off - outer.row_off), int(inner.col_off - outer.col_off)
    return slice(r0, r0 + int(inner.height)), slice(c0, c0 + int(inner.width))


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """2-D cosine window weight of one tile: the outer product of :func:`blend_weights_1d`."""
    w = blend_weights_1d(size, overlap)
    return np.outer(w, w)


def blend_weights_1d(size: int, overlap: int) -> np.ndarray:
    """1-D cosine window weight of one tile.

    A raised-cosine ramp across each overlap band and 1 inside, so two neighbours' weights sum to exactly 1
    where they overlap and every pixel is dominated by the tile that sees it with more context. Strictly
    positive everywhere. (``crop`` blending needs no ramp: :func:`tile_weights` selects the tile's core.)

    >>> w = blend_weights_1d(8, 4)  # the last 4 of one tile meet the first 4 of the next
    >>> bool(np.allclose(w[4:] + w[:4], 1.0))
    True
    """
    w = np.ones(size, dtype=np.float32)
    if overlap:
        x = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
        ramp = np.sin(0.5 * np.pi * x) ** 2
        w[:overlap] = ramp
        w[size - overlap :] = ramp[::-1]
    return w


def tile_weights(tile: Tile, size: int, overlap: int, mode: str) -> np.ndarray:
    """Blend weight of ``tile`` over its window: the cosine window, or 1 on its own core for ``crop``."""
    if mode != "crop":
        return blend_weights(size, overlap)
    w = np.zeros((size, size), dtype=np.float32)
    r0, c0 = int(tile.core.row_off - tile.window.row_off), int(tile.core.col_off - tile.window.col_off)
    w[r0 : r0 + int(tile.core.height), c0 : c0 + int(tile.core.width)] = 1.0
    return w


def pad_to(data: np.ndarray, before: tuple[int, int], after: tuple[int, int]) -> np.ndarray:
    """Reflect-pad the last two axes (edge-pad axes of length 1, which cannot be reflected)."""
    if not any(before) and not any(after):
        return data
    out = data
    for axis, (b, a) in zip((-2, -1), zip(before, after)):
        if not b and not a:
            continue
        width = [(0, 0)] * data.ndim
        width[axis] = (b, a)
        out = np.pad(out, width, mode="reflect" if out.shape[axis] > 1 else "edge")
    return out

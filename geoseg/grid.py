"""Tile geometry: pure functions over :class:`rasterio.windows.Window` values.

Vocabulary (pixels): a *tile* is the ``size`` x ``size`` window fed to the model; neighbouring tiles share
``overlap`` pixels, so tiles start every ``stride = size - overlap`` pixels and each tile's *core* (the
``stride`` x ``stride`` centre) is surrounded by a *halo* of ``overlap // 2``. A *chunk* groups
``chunk_tiles`` x ``chunk_tiles`` cores; it is one Zarr chunk and one Dask task. The tile grid is anchored
at the scene origin, so a tile's position never depends on the chunking.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Tile grid over a ``height`` x ``width`` scene."""

    height: int
    width: int
    size: int
    overlap: int
    chunk_tiles: int

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    @property
    def halo(self) -> int:
        return self.overlap // 2

    @property
    def chunk(self) -> int:
        return self.stride * self.chunk_tiles

    @property
    def chunks_shape(self) -> tuple[int, int]:
        """Number of chunks along (rows, cols)."""
        return math.ceil(self.height / self.chunk), math.ceil(self.width / self.chunk)

    def dask_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunk sizes along rows and cols, in Dask's notation."""
        return _split(self.height, self.chunk), _split(self.width, self.chunk)

    def chunk_window(self, i: int, j: int) -> Window:
        """Core window of chunk ``(i, j)``, clipped to the scene."""
        r0, c0 = i * self.chunk, j * self.chunk
        return Window(c0, r0, min(self.chunk, self.width - c0), min(self.chunk, self.height - r0))

    def chunk_windows(self) -> Iterator[tuple[tuple[int, int], Window]]:
        ny, nx = self.chunks_shape
        for i in range(ny):
            for j in range(nx):
                yield (i, j), self.chunk_window(i, j)

    def tiles_per_side(self, core: int) -> int:
        """Tiles needed to cover a chunk core of ``core`` pixels."""
        return max(1, math.ceil(core / self.stride))

    def tiles_per_chunk(self) -> np.ndarray:
        """Number of tiles in each chunk, shape :attr:`chunks_shape` (the work of its inference task)."""
        rows, cols = (np.array([self.tiles_per_side(n) for n in c]) for c in self.dask_chunks())
        return np.outer(rows, cols)

    def neighbours(self, i: int, j: int) -> list[tuple[int, int]]:
        """The chunks around chunk ``(i, j)`` (up to 8): their halos reach into its core."""
        ny, nx = self.chunks_shape
        return [(a, b) for a in range(max(i - 1, 0), min(i + 2, ny)) for b in range(max(j - 1, 0), min(j + 2, nx))
                if (a, b) != (i, j)]

    def extended_window(self, core: Window) -> Window:
        """Window read for a chunk: its tiles' full extent (may reach beyond the scene)."""
        ny, nx = self.tiles_per_side(int(core.height)), self.tiles_per_side(int(core.width))
        return Window(
            core.col_off - self.halo,
            core.row_off - self.halo,
            nx * self.stride + 2 * self.halo,
            ny * self.stride + 2 * self.halo,
        )

    def tile_offsets(self, core: Window) -> list[tuple[int, int]]:
        """(row, col) offsets of each tile inside the chunk's extended window."""
        ny, nx = self.tiles_per_side(int(core.height)), self.tiles_per_side(int(core.width))
        return [(a * self.stride, b * self.stride) for a in range(ny) for b in range(nx)]


def _split(total: int, step: int) -> tuple[int, ...]:
    full, rest = divmod(total, step)
    return (step,) * full + ((rest,) if rest else ())


def blend_weights(size: int, overlap: int, mode: str) -> np.ndarray:
    """2-D window weight of one tile: the outer product of :func:`blend_weights_1d`."""
    w = blend_weights_1d(size, overlap, mode)
    return np.outer(w, w)


def blend_weights_1d(size: int, overlap: int, mode: str) -> np.ndarray:
    """1-D window weight of one tile.

    ``cosine``: a raised-cosine ramp across each overlap band and 1 inside, so two neighbours' weights sum
    to exactly 1 where they overlap and every pixel is dominated by the tile that sees it with more context.
    Strictly positive everywhere. ``crop``: 1 on the core, 0 on the halo, so each pixel comes from the
    one tile whose core holds it.

    >>> w = blend_weights_1d(8, 4, "cosine")  # the last 4 of one tile meet the first 4 of the next
    >>> bool(np.allclose(w[4:] + w[:4], 1.0))
    True
    """
    w = np.ones(size, dtype=np.float32)
    if overlap:
        if mode == "crop":
            h = overlap // 2
            w[:h] = 0
            w[size - h :] = 0
        else:
            x = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
            ramp = np.sin(0.5 * np.pi * x) ** 2
            w[:overlap] = ramp
            w[size - overlap :] = ramp[::-1]
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
        mode = "reflect" if out.shape[axis] > 1 else "edge"
        out = np.pad(out, width, mode=mode)
    return out

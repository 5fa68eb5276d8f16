"""The accumulator store: every chunk's weighted probability sums, and the halo exchange between chunks.

An inference task sums ``w * p`` (and ``w``) over its tiles on the chunk's *extent*, which reaches past the
window the chunk owns. It stores the part on its own window in ``core`` and the rest as four *pieces*
(``top`` and ``bottom`` across the extent's full width, ``left`` and ``right`` beside the window); the
stitch task of a chunk adds the pieces of its neighbours that fall on its window. The sums equal blending
every tile of the scene at once, whatever the chunking. All of that geometry lives in
:class:`AccumulatorLayout`, and only there.

Why not :func:`dask.array.overlap.overlap`: it exchanges halos by slicing whole neighbour blocks, so each
block's full accumulator (classes x chunk^2 float32) stays in worker memory until all its neighbours are
stitched - about three rows of chunks, so peak memory grew with the scene's width (6.5 GiB at 16384^2).
Through the store, a task holds only its own chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zarr
from rasterio.windows import Window, intersect, intersection

from geoseg.grid import TileGrid, relative
from geoseg.segment.tiles import read_array, scratch_compressors, zarr_array

PIECES = ("top", "bottom", "left", "right")


@dataclass(frozen=True)
class AccumulatorLayout:
    """Where each chunk's sums go in the store: its window in ``core``, the rest in four pieces."""

    grid: TileGrid
    n_classes: int

    @property
    def channels(self) -> int:
        """Class sums plus the weight sum."""
        return self.n_classes + 1

    def extent(self, i: int, j: int) -> Window | None:
        """Chunk ``(i, j)``'s extent inside the scene: where its tiles put sums (None: no tiles)."""
        ext = self.grid.chunk_extent(i, j)
        return None if ext is None else self.grid.clip(ext)

    def pieces(self, i: int, j: int) -> dict[str, Window]:
        """Scene windows of chunk ``(i, j)``'s pieces (those that are not empty)."""
        ext = self.extent(i, j)
        if ext is None:
            return {}
        core = self.grid.chunk_window(i, j)
        e_r0, e_c0 = int(ext.row_off), int(ext.col_off)
        e_r1, e_c1 = e_r0 + int(ext.height), e_c0 + int(ext.width)
        r0, c0 = int(core.row_off), int(core.col_off)
        r1, c1 = r0 + int(core.height), c0 + int(core.width)
        found = {
            "top": Window(e_c0, e_r0, e_c1 - e_c0, r0 - e_r0),
            "bottom": Window(e_c0, r1, e_c1 - e_c0, e_r1 - r1),
            "left": Window(e_c0, r0, c0 - e_c0, r1 - r0),
            "right": Window(c1, r0, e_c1 - c1, r1 - r0),
        }
        return {name: w for name, w in found.items() if w.width > 0 and w.height > 0}

    @cached_property
    def piece_shapes(self) -> dict[str, tuple[int, int]]:
        """Largest (height, width) of each piece over all chunks: one Zarr chunk per chunk and piece."""
        shapes = dict.fromkeys(PIECES, (0, 0))
        for (i, j), _ in self.grid.chunk_windows():
            for name, w in self.pieces(i, j).items():
                h, wd = shapes[name]
                shapes[name] = (max(h, int(w.height)), max(wd, int(w.width)))
        return shapes

    def create(self, path: str) -> None:
        """An empty store: ``core`` (channels, H, W) and, per chunk, its pieces."""
        grid, k, c = self.grid, self.channels, self.grid.chunk
        ny, nx = grid.chunks_shape
        group = zarr.open_group(path, mode="w")
        codecs = scratch_compressors()
        group.create_array("core", shape=(k, grid.height, grid.width), dtype="float32", chunks=(k, c, c),
                           fill_value=0, compressors=codecs)
        for name, (h, w) in self.piece_shapes.items():
            if h and w:
                group.create_array(name, shape=(ny, nx, k, h, w), dtype="float32", chunks=(1, 1, k, h, w),
                                   fill_value=0, compressors=codecs)

    def matches(self, path: str) -> bool:
        """Whether ``path`` holds a store of exactly this layout (a work folder being resumed)."""
        try:
            ok = zarr_array(path, "core").shape == (self.channels, self.grid.height, self.grid.width)
            for name, (h, w) in self.piece_shapes.items():
                if h and w:
                    ok = ok and zarr_array(path, name).shape == (*self.grid.chunks_shape, self.channels, h, w)
            return bool(ok)
        except (FileNotFoundError, KeyError, ValueError, TypeError, OSError, zarr.errors.BaseZarrError):
            return False

    def store(self, path: str, i: int, j: int, sums: np.ndarray) -> None:
        """Write chunk ``(i, j)``'s sums over its :meth:`extent`: its window into ``core``, the rest as pieces."""
        ext = self.extent(i, j)
        if ext is None:
            return
        core = self.grid.chunk_window(i, j)
        zarr_array(path, "core", "r+")[(slice(None), *core.toslices())] = sums[(slice(None), *relative(core, ext))]
        for name, w in self.pieces(i, j).items():
            h, wd = int(w.height), int(w.width)
            zarr_array(path, name, "r+")[i, j, :, :h, :wd] = sums[(slice(None), *relative(w, ext))]

    def merge(self, path: str, i: int, j: int) -> np.ndarray:
        """Chunk ``(i, j)``'s sums on its window: its own, plus every neighbour's piece that falls on it."""
        core = self.grid.chunk_window(i, j)
        acc = read_array(zarr_array(path, "core"), (slice(None), *core.toslices()))
        for a, b in self.grid.neighbours(i, j):
            for name, w in self.pieces(a, b).items():
                if not intersect(w, core):
                    continue
                part = intersection(w, core)
                rows, cols = relative(part, w)
                piece = read_array(zarr_array(path, name), (a, b, slice(None), rows, cols))
                acc[(slice(None), *relative(part, core))] += piece
        return acc

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

    def window(self, i: int, j: int, halo: int = 0) -> Window:
        """Chunk ``(i, j)``'s window grown by ``halo`` pixels on every side, clipped to the scene."""
        core = self.grid.chunk_window(i, j)
        if not halo:
            return core
        return self.grid.clip(Window(core.col_off - halo, core.row_off - halo, core.width + 2 * halo,
                                     core.height + 2 * halo))

    @cached_property
    def reach(self) -> int:
        """How far past its own window any chunk's extent reaches, in pixels."""
        most = 0
        for (a, b), w in self.grid.chunk_windows():
            ext = self.extent(a, b)
            if ext is not None:
                most = max(most, int(w.row_off - ext.row_off), int(w.col_off - ext.col_off),
                           int(ext.row_off + ext.height - w.row_off - w.height),
                           int(ext.col_off + ext.width - w.col_off - w.width))
        return most

    def sources(self, i: int, j: int, halo: int = 0) -> list[tuple[int, int]]:
        """The chunks whose sums fall on :meth:`window` ``(i, j, halo)``: the chunk itself and those reaching it.

        Without a halo these are among the 3 x 3 neighbours; a halo can reach one further, e.g. where the
        last tile of a row is moved back to end at the scene's edge.
        """
        window = self.window(i, j, halo)
        k = 1 + -(-(self.reach + halo) // self.grid.chunk)
        ny, nx = self.grid.chunks_shape
        found = []
        for a in range(max(i - k, 0), min(i + k + 1, ny)):
            for b in range(max(j - k, 0), min(j + k + 1, nx)):
                ext = self.extent(a, b)
                if ext is not None and intersect(ext, window):
                    found.append((a, b))
        return found

    def merge(self, path: str, i: int, j: int, halo: int = 0) -> tuple[np.ndarray, Window]:
        """Chunk ``(i, j)``'s sums on its window grown by ``halo`` (:meth:`window`), and that window.

        The store's ``core`` there, plus every piece of the :meth:`sources` that falls on it (the stitch
        task waits for their inference).
        """
        window = self.window(i, j, halo)
        acc = read_array(zarr_array(path, "core"), (slice(None), *window.toslices()))
        for a, b in self.sources(i, j, halo):
            for name, w in self.pieces(a, b).items():
                if not intersect(w, window):
                    continue
                part = intersection(w, window)
                rows, cols = relative(part, w)
                piece = read_array(zarr_array(path, name), (a, b, slice(None), rows, cols))
                acc[(slice(None), *relative(part, window))] += piece
        return acc, window

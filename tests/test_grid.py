"""Tile geometry: every pixel in exactly one core, weights that blend to one."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from geoseg.grid import TileGrid, blend_weights, blend_weights_1d, pad_to


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), size=st.integers(8, 64),
       overlap_half=st.integers(0, 16), chunk_tiles=st.integers(1, 4))
def test_chunk_cores_cover_scene_once_and_tiles_cover_cores(height, width, size, overlap_half, chunk_tiles):  # noqa: ANN001
    overlap = min(2 * overlap_half, size // 2 // 2 * 2)
    grid = TileGrid(height, width, size, overlap, chunk_tiles)
    cover = np.zeros((height, width), dtype=int)
    for (i, j), core in grid.chunk_windows():
        r0, c0 = int(core.row_off), int(core.col_off)
        cover[r0 : r0 + int(core.height), c0 : c0 + int(core.width)] += 1
        ext = grid.extended_window(core)
        assert ext.row_off == r0 - grid.halo and ext.col_off == c0 - grid.halo
        tiles = np.zeros((int(ext.height), int(ext.width)), dtype=int)
        for r, c in grid.tile_offsets(core):
            assert r + size <= ext.height and c + size <= ext.width
            tiles[r + grid.halo : r + grid.halo + grid.stride, c + grid.halo : c + grid.halo + grid.stride] += 1
        # every core pixel lies in exactly one tile core
        assert (tiles[grid.halo : grid.halo + int(core.height), grid.halo : grid.halo + int(core.width)] == 1).all()
    assert (cover == 1).all()
    assert sum(grid.dask_chunks()[0]) == height and sum(grid.dask_chunks()[1]) == width


@given(size=st.integers(4, 128), overlap_half=st.integers(1, 32))
def test_cosine_weights_are_positive_and_sum_to_one_across_neighbours(size, overlap_half):  # noqa: ANN001
    overlap = 2 * overlap_half
    assume(2 * overlap <= size)
    w = blend_weights_1d(size, overlap, "cosine")
    assert (w > 0).all() and w.max() <= 1.0
    if 2 * overlap < size:
        assert w.max() == 1.0
    assert np.allclose(w[size - overlap :] + w[:overlap], 1.0)
    w2 = blend_weights(size, overlap, "cosine")
    assert w2.shape == (size, size) and np.allclose(w2, np.outer(w, w))


def test_crop_weights_select_the_core():
    w = blend_weights_1d(16, 4, "crop")
    assert list(w) == [0, 0] + [1] * 12 + [0, 0]


def test_pad_reflects_and_handles_single_pixels():
    a = np.arange(4).reshape(1, 1, 4)
    assert pad_to(a, (0, 2), (0, 1)).tolist() == [[[2, 1, 0, 1, 2, 3, 2]]]
    one = np.array([[[5]]])
    assert pad_to(one, (2, 2), (2, 2)).shape == (1, 5, 5) and (pad_to(one, (2, 2), (2, 2)) == 5).all()


def test_chunk_window_is_clipped():
    grid = TileGrid(100, 50, 32, 8, 2)
    assert grid.chunk == 48 and grid.chunks_shape == (3, 2)
    assert grid.chunk_window(2, 1) == Window(48, 96, 2, 4)

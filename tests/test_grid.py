"""Tile geometry: every pixel in exactly one core, weights that blend to one."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from geoseg.grid import TileGrid, blend_weights, blend_weights_1d, pad_to, relative, tile_weights


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), size=st.integers(8, 64),
       overlap_half=st.integers(0, 16), chunk_tiles=st.integers(1, 4))
def test_chunk_cores_cover_scene_once_and_tiles_cover_cores(height, width, size, overlap_half, chunk_tiles):  # noqa: ANN001
    overlap = min(2 * overlap_half, size // 2 // 2 * 2)
    grid = TileGrid(height, width, size, overlap, chunk_tiles)
    chunks = np.zeros((height, width), dtype=int)
    cores = np.zeros((height, width), dtype=int)
    for (i, j), window in grid.chunk_windows():
        chunks[window.toslices()] += 1
        tiles = grid.tiles_of(i, j)
        assert len(tiles) == grid.tiles_per_chunk()[i, j]
        ext = grid.chunk_extent(i, j)
        for t in tiles:
            assert (t.window.width, t.window.height) == (size, size)
            # the core lies inside the tile and inside the scene; the tile inside its chunk's extent
            assert t.window.row_off <= t.core.row_off and t.core.row_off + t.core.height <= t.window.row_off + size
            assert t.window.col_off <= t.core.col_off and t.core.col_off + t.core.width <= t.window.col_off + size
            assert ext.row_off <= t.window.row_off and t.window.row_off + size <= ext.row_off + ext.height
            cores[t.core.toslices()] += 1
    # chunk windows and tile cores each cover every pixel of the scene exactly once
    assert (chunks == 1).all() and (cores == 1).all()


@given(size=st.integers(4, 128), overlap_half=st.integers(1, 32))
def test_cosine_weights_are_positive_and_sum_to_one_across_neighbours(size, overlap_half):  # noqa: ANN001
    overlap = 2 * overlap_half
    assume(2 * overlap <= size)
    w = blend_weights_1d(size, overlap)
    assert (w > 0).all() and w.max() <= 1.0
    if 2 * overlap < size:
        assert w.max() == 1.0
    assert np.allclose(w[size - overlap :] + w[:overlap], 1.0)
    w2 = blend_weights(size, overlap)
    assert w2.shape == (size, size) and np.allclose(w2, np.outer(w, w))


def test_crop_weights_select_the_core():
    grid = TileGrid(height=40, width=40, size=16, overlap=4, chunk_tiles=2)
    tile = next(t for t in grid.tiles_of(1, 1) if t.core.row_off > 0 and t.core.col_off > 0)
    w = tile_weights(tile, 16, 4, "crop")
    rows, cols = relative(tile.core, tile.window)
    assert (w[rows, cols] == 1).all() and w.sum() == tile.core.height * tile.core.width


def test_pad_reflects_and_handles_single_pixels():
    a = np.arange(4).reshape(1, 1, 4)
    assert pad_to(a, (0, 2), (0, 1)).tolist() == [[[2, 1, 0, 1, 2, 3, 2]]]
    one = np.array([[[5]]])
    assert pad_to(one, (2, 2), (2, 2)).shape == (1, 5, 5) and (pad_to(one, (2, 2), (2, 2)) == 5).all()


def test_chunk_window_is_clipped():
    grid = TileGrid(100, 50, 32, 8, 2)
    assert grid.chunk == 48 and grid.chunks_shape == (3, 2)
    assert grid.chunk_window(2, 1) == Window(48, 96, 2, 4)


def test_raster_grid_bounds_and_pixel_area():
    from affine import Affine
    from rasterio.crs import CRS

    from geoseg.grid import RasterGrid

    g = RasterGrid(CRS.from_epsg(32632), Affine(10, 0, 600000, 0, -10, 5300000), 30, 20)
    assert g.bounds == (600000, 5299700, 600200, 5300000) and g.pixel_area == 100


@settings(max_examples=80, deadline=None)
@given(length=st.integers(1, 5000), size=st.sampled_from([32, 64, 256, 512]), overlap_half=st.integers(0, 64),
       chunk_tiles=st.integers(1, 4))
def test_tiles_lie_inside_the_scene_and_are_as_few_as_the_peers(length, size, overlap_half, chunk_tiles):
    overlap = min(2 * overlap_half, size // 2 // 2 * 2)
    grid = TileGrid(length, length, size, overlap, chunk_tiles)
    n = grid.tiles_shape[0]
    stride = size - overlap
    expected = 1 if length <= size else -(-(length - overlap) // stride)  # ceil((L - overlap) / stride)
    assert n == expected
    starts = sorted({int(t.window.row_off) for (i, j), _ in grid.chunk_windows() for t in grid.tiles_of(i, j)})
    assert len(starts) == n and starts[0] == 0
    if length >= size:
        assert starts[-1] == length - size  # the last tile is moved back inside, never padded past the edge


def test_a_4096_scene_takes_81_tiles_of_512_with_64_overlap():
    assert TileGrid(4096, 4096, 512, 64, 3).tiles_shape == (9, 9)
    assert TileGrid(2048, 2048, 512, 64, 3).tiles_shape == (5, 5)

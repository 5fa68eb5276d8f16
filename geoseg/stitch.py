"""Stitch stage: merge the overlapping tile predictions of neighbouring chunks, then pick classes.

Each chunk's inference returns weighted probability sums over its *extended* window (core plus halo).
The halo of one chunk lies on the core of its neighbour, so the sums are exchanged with
:func:`dask.array.overlap.overlap` (the halo exchange primitive) and added onto the cores here: the result
equals blending every tile of the scene at once, whatever the chunking. Class ids come from the
probabilities (never from argmax labels of single tiles).
"""

from __future__ import annotations

from itertools import product

import dask.array as da
import numpy as np
from dask.array.overlap import overlap

from geoseg.grid import TileGrid


def _segments(core: int, halo: int, has_before: bool, has_after: bool) -> list[tuple[slice, slice]]:
    """(source, target) slices along one axis of an overlapped block, all clipped to the core.

    Block layout: [neighbour-before's trailing halo] [own halo | own core | own halo] [neighbour-after's
    leading halo]. The neighbour strips land on the first and last ``halo`` pixels of the core.
    """
    lead = halo if has_before else 0
    segs = [(slice(lead + halo, lead + halo + core), slice(0, core))]
    if halo:
        n = min(halo, core)
        if has_before:
            segs.append((slice(0, n), slice(0, n)))
        if has_after:
            start = lead + halo + core + halo
            segs.append((slice(start + halo - n, start + halo), slice(core - n, core)))
    return segs


def merge_block(block: np.ndarray, grid: TileGrid, i: int, j: int) -> np.ndarray:
    """Sum a chunk's own accumulator and its neighbours' halos onto its core."""
    ny, nx = grid.chunks_shape
    core = grid.chunk_window(i, j)
    rows = _segments(int(core.height), grid.halo, i > 0, i < ny - 1)
    cols = _segments(int(core.width), grid.halo, j > 0, j < nx - 1)
    out = np.zeros((block.shape[0], int(core.height), int(core.width)), dtype=np.float32)
    for (rs, rt), (cs, ct) in product(rows, cols):
        out[:, rt, ct] += block[:, rs, cs]
    return out


def stitch_scores(ext: da.Array, grid: TileGrid) -> da.Array:
    """Merged accumulators (classes + 1, H, W) from the per-chunk extended accumulators."""
    h = grid.halo
    merged = overlap(ext, depth={0: 0, 1: h, 2: h}, boundary="none") if h else ext
    row_chunks, col_chunks = grid.dask_chunks()

    def _merge(block: np.ndarray, block_info=None) -> np.ndarray:  # noqa: ANN001
        _, i, j = block_info[0]["chunk-location"]
        return merge_block(block, grid, i, j)

    return merged.map_blocks(_merge, dtype=np.float32, chunks=(ext.chunks[0], row_chunks, col_chunks))


def classify(acc: np.ndarray, valid: np.ndarray, lut: np.ndarray, nodata: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (uint8) and top probability (float32) from a merged accumulator.

    Invalid pixels, and pixels no tile predicted, get ``nodata`` and confidence 0.
    """
    weight = acc[-1]
    known = valid & (weight > 0)
    probs = acc[:-1] / np.where(known, weight, 1.0)
    index = probs.argmax(axis=0)
    labels = np.where(known, lut[index], np.uint8(nodata)).astype(np.uint8)
    conf = np.where(known, probs.max(axis=0), 0.0).astype(np.float32)
    return labels, conf

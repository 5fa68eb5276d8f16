"""The scores store (``write.keep_scores``): per-class probabilities of the stitched scene as float16 Zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from rasterio.windows import Window

from geoseg.classes import ClassMap
from geoseg.grid import RasterGrid, TileGrid


def create_scores_store(path: Path, grid: RasterGrid, tiles: TileGrid, classes: ClassMap) -> None:
    """An empty (class, y, x) float16 store on the scene grid, chunked like the scene graph."""
    arr = zarr.open_array(
        str(path), mode="w", shape=(len(classes), grid.height, grid.width), dtype="float16",
        chunks=(len(classes), tiles.chunk, tiles.chunk), fill_value=0, dimension_names=("class", "y", "x"),
    )
    arr.attrs.update({"classes": classes.to_records(), "proj:wkt2": grid.crs.to_wkt(),
                      "spatial:transform": list(grid.transform)[:6]})


def write_scores(path: str, window: Window, sums: np.ndarray) -> None:
    """Store the probabilities of merged sums (classes + weight) on ``window``."""
    probs = sums[:-1] / np.where(sums[-1] > 0, sums[-1], 1.0)
    zarr.open_array(path, mode="r+")[(slice(None), *window.toslices())] = probs.astype(np.float16)

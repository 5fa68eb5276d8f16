"""The block store: stitched class ids and confidence as Zarr, written by the stitch tasks on the workers.

Where a scene's outputs are written on the workers (``write.on_workers``), each stitch task stores its
chunk here instead of sending it to the client, and one worker task per scene reads the chunks back in
order to write the COGs (:func:`geoseg.write.write_stored`). Zarr chunks are the scene graph's chunks, so
every task writes whole chunks of its own and no two tasks touch one. The confidence is stored in its
output encoding, so the COG gets exactly the values the streaming path writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr
from rasterio.windows import Window

from geoseg.grid import TileGrid
from geoseg.segment.tiles import read_array, scratch_compressors, zarr_array


@dataclass(frozen=True)
class BlockStore:
    """Where and how stitch tasks store their blocks: the store's path, the nodata id, the confidence encoding."""

    path: str
    nodata: int
    confidence: str = "none"
    """``write.confidence``: none, uint8 or float16 (stored as float32, as the GeoTIFF holds it)."""

    def create(self, grid: TileGrid) -> None:
        """An empty store on the scene, chunked like ``grid``'s chunks (an existing one is replaced)."""
        group = zarr.open_group(self.path, mode="w")
        shape, chunks = (grid.height, grid.width), (grid.chunk, grid.chunk)
        group.create_array("labels", shape=shape, dtype="uint8", chunks=chunks, fill_value=self.nodata,
                           dimension_names=("y", "x"), compressors=scratch_compressors())
        if self.confidence != "none":
            dtype, fill = ("uint8", 255) if self.confidence == "uint8" else ("float32", -1.0)
            group.create_array("confidence", shape=shape, dtype=dtype, chunks=chunks, fill_value=fill,
                               dimension_names=("y", "x"), compressors=scratch_compressors())

    def store(self, window: Window, labels: np.ndarray, confidence: np.ndarray) -> None:
        """Store one stitched chunk: class ids and top probability (encoded here as the writer encodes it)."""
        from geoseg.write import encode_confidence

        index = window.toslices()
        zarr_array(self.path, "labels", "r+")[index] = labels
        if self.confidence != "none":
            zarr_array(self.path, "confidence", "r+")[index] = encode_confidence(
                confidence, labels != self.nodata, self.confidence)

    def blocks(self, grid: TileGrid) -> Iterator[tuple[Window, np.ndarray, np.ndarray | None]]:
        """Every chunk's window, class ids and encoded confidence (None when not stored), row by row."""
        labels = zarr_array(self.path, "labels")
        conf = zarr_array(self.path, "confidence") if self.confidence != "none" else None
        for _, window in grid.chunk_windows():
            index = window.toslices()
            yield window, read_array(labels, index), None if conf is None else read_array(conf, index)


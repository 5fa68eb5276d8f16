"""The shipped default pipeline: what ``geoseg run SCENE.tif --model M.safetensors`` runs."""

from __future__ import annotations

from typing import Any

#: Every processing setting of pipelines/landcover.yaml, without its demo scene, model, folder and reference.
DEFAULT_PIPELINE: dict[str, Any] = {
    "tile": {"size": 512, "overlap": 64, "chunk_tiles": 3},
    "infer": {"device": "auto", "precision": "auto"},
    "stitch": {"blend": "crop"},
    "write": {"nodata": 255, "confidence": "uint8"},
    "vectorize": {"output": "landcover.gpkg", "min_area_px": 4},
    "cluster": {"backend": "local"},
}

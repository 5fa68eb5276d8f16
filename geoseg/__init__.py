"""geoseg: tiled, Dask-distributed land-cover segmentation of large georeferenced rasters.

The public API: :func:`load_config`, :func:`run_pipeline` (a whole run, as ``geoseg run``), and the stages
it wires, e.g. :func:`read_raster` and :func:`segment_scene` (the tile/infer/stitch scene graph).
"""

from __future__ import annotations

from typing import Any

from geoseg._version import __version__

__all__ = ["__version__", "load_config", "read_raster", "run_pipeline", "segment_scene"]

_LAZY = {"load_config": "geoseg.config", "run_pipeline": "geoseg.pipeline", "read_raster": "geoseg.read",
         "segment_scene": "geoseg.segment"}


def __getattr__(name: str) -> Any:
    # Lazy: `geoseg --help` and config loading must not pay for importing torch and dask.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)

"""geoseg: tiled, Dask-distributed land-cover segmentation of large georeferenced rasters."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "run_pipeline"]


def __getattr__(name: str):
    # Lazy: `geoseg --help` and config loading must not pay for importing torch and dask.
    if name == "load_config":
        from geoseg.config import load_config

        return load_config
    if name == "run_pipeline":
        from geoseg.pipeline import run_pipeline

        return run_pipeline
    raise AttributeError(name)

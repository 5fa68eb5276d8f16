"""Exceptions raised by geoseg.

Every user-facing problem is a :class:`GeosegError`; the CLI prints its message on one line and exits
non-zero. Subclasses also inherit the matching stdlib type so callers that only know ``ValueError`` or
``FileNotFoundError`` still catch them (the rasterio ``RasterioIOError(RasterioError, OSError)`` habit).
"""

from __future__ import annotations


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose."""


class ConfigError(GeosegError, ValueError):
    """A configuration file or override is invalid."""


class InputError(GeosegError, ValueError):
    """An input raster or vector cannot be used as it is."""


class RasterNotFoundError(GeosegError, FileNotFoundError):
    """An input raster does not exist."""


class CheckpointError(GeosegError, ValueError):
    """A model checkpoint is missing, unreadable, unsafe or does not fit the pipeline."""


class OutputExistsError(GeosegError, FileExistsError):
    """An output exists and ``--overwrite`` was not given."""


class ClusterError(GeosegError, RuntimeError):
    """The Dask cluster could not be created or reached."""


class OutputWriteError(GeosegError, OSError):
    """An output could not be written (disk full, folder gone, permissions)."""

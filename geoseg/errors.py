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


#: Exit codes of the CLI (docs/batch.md): every scene done or skipped (an empty night too).
EXIT_OK = 0
#: Nothing could run: a configuration, input or cluster error (a single ``geoseg run`` that failed too).
EXIT_ERROR = 1
#: A usage error on the command line, or an internal error (a bug: please report it).
EXIT_USAGE = 2
#: ``geoseg batch`` ran, and some scenes failed (see batch.json); the others are done.
EXIT_SCENES_FAILED = 3
#: Stopped by SIGINT or SIGTERM (Ctrl-C, a time limit, systemctl stop); rerun to continue.
EXIT_INTERRUPTED = 130

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


class NoScenesError(InputError):
    """``geoseg batch --scenes`` names no scene (``--allow-empty`` makes that a night without work)."""


class OutputError(GeosegError, OSError):
    """An output cannot be written where it was asked for; the inputs are fine, so a rerun can succeed.

    ``geoseg batch`` retries a scene that failed this way on its next run (docs/batch.md).
    """


class OutputExistsError(OutputError, FileExistsError):
    """An output exists and ``--overwrite`` was not given."""


class OutputWriteError(OutputError):
    """An output could not be written.

    Its folder cannot be created or written, the disk is full, or it would replace one of the run's inputs.
    """


class ClusterError(GeosegError, RuntimeError):
    """The Dask cluster could not be created or reached."""


#: Exit codes of the CLI (docs/batch.md): every scene done or skipped (an empty night too).
EXIT_OK = 0
#: Nothing could run: a configuration, input or cluster error (a single ``geoseg run`` that failed too).
EXIT_ERROR = 1
#: A usage error on the command line (an unknown option, a missing argument).
EXIT_USAGE = 2
#: ``geoseg batch`` ran, and some scenes failed (see batch.json); the others are done.
EXIT_SCENES_FAILED = 3
#: An internal error: a bug in geoseg (please report it, with the output of ``--verbose``).
EXIT_INTERNAL = 4
#: Stopped by SIGINT or SIGTERM (Ctrl-C, a time limit, systemctl stop); rerun to continue.
EXIT_INTERRUPTED = 130

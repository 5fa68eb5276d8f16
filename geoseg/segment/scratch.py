"""The scene graph's scratch folder: its stores, chunk-level completion markers, and a self-check on resume.

The folder holds the tile and accumulator stores and one marker per finished chunk and stage
(``done/infer-3-4`` holds that task's integer result). Markers are written by rename after the chunk's
data, so a marker always means the chunk is complete. The folder's description (``work.json``: the
fingerprint of the input, model and settings) is written only after the stores it describes exist. On
open, the description, the fingerprint and the stores' layout are checked; anything that does not match
is rebuilt from scratch, so a folder left by a crash at any moment resumes or restarts, never fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from geoseg import _faults
from geoseg._io import remove, write_text_atomic
from geoseg.errors import GeosegError

DESCRIPTION = "work.json"


class Scratch:
    """A scene graph's scratch folder with its completion markers."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.markers = self.path / "done"
        self.tiles = self.path / "tiles.zarr"
        self.accumulators = self.path / "accumulators.zarr"

    def open(self, valid: Callable[[Scratch], bool], create: Callable[[Scratch], None]) -> bool:
        """Reuse the folder when it holds this work and ``valid`` accepts its stores, else make it anew.

        ``create`` makes the stores; the description is written after it returns. Returns whether work
        was resumed.
        """
        try:
            described = json.loads((self.path / DESCRIPTION).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            described = None
        if described == self.fingerprint and self.markers.is_dir() and valid(self):
            return True
        remove(self.path)  # stale, half-made or damaged: start afresh
        self.markers.mkdir(parents=True)
        create(self)
        _faults.point("scratch")  # stores made, not yet described: a rerun must rebuild them
        write_text_atomic(self.path / DESCRIPTION, json.dumps({"fingerprint": self.fingerprint}) + "\n")
        return False

    def count(self, stage: str) -> int:
        """Chunks of ``stage`` already marked done."""
        return sum(1 for _ in self.markers.glob(f"{stage}-*"))  # temporary names start with "."

    def close(self) -> None:
        """Drop the scratch work once the outputs are complete."""
        remove(self.path)


def run_once(markers: str, stage: str, i: int, j: int, fn: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """``fn(*args, **kwargs)`` for chunk ``(i, j)`` of ``stage``, unless a marker says it is done already.

    Returns ``fn``'s integer result, or the one stored in the marker. Runs in Dask tasks on the workers.
    """
    marker = Path(markers) / f"{stage}-{i}-{j}"
    try:
        return int(marker.read_text())
    except (OSError, ValueError):
        pass  # not done, or a marker a crash left empty: do it (again)
    error = None
    try:
        value = int(fn(*args, **kwargs))
    except GeosegError as exc:
        # Dask ships a task's exception with its __context__ chain (tblib); a chain holding a GDAL error does
        # not pickle and would reach the client as a bare Exception. Raised here, outside the except block,
        # the user's one-line error travels alone.
        error = type(exc)(*exc.args)
    if error is not None:
        raise error
    write_text_atomic(marker, str(value))
    return value

"""Resumable, idempotent runs: fingerprints of what decides the outputs, and chunk-level completion markers.

A run keeps its scratch stores in ``output_dir/.geoseg-work`` together with one marker file per finished
chunk and stage (``done/infer-3-4`` holds that task's result). Markers are written by rename after the
chunk's data, so a marker always means the chunk is complete. A rerun after Ctrl-C, SIGTERM or a crash
finds the work folder, checks that it was made from the same input, model and settings (its fingerprint),
and skips every marked chunk; a folder made from anything else is stale scratch and is started afresh.
The folder is removed once the outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from geoseg import __version__
from geoseg._io import file_digest, remove, write_text_atomic
from geoseg.config import PipelineConfig, dump_config
from geoseg.errors import GeosegError

WORK_DIR = ".geoseg-work"

#: Config sections that cannot change what a run writes (where and how fast it runs, not what).
_NOT_OUTPUT = ("input", "output_dir", "overwrite", "cluster", "batch")
#: Config sections that decide the scratch stores (tiles, accumulated probabilities).
_WORK = ("read", "tile", "infer", "stitch")

_DIGESTS: dict[tuple[str, int, int], str] = {}


def model_digest(path: Path) -> str:
    """SHA-256 of a checkpoint, computed once per (path, size, mtime) in this process (a batch hashes it once)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(Path(path))
    return _DIGESTS[key]


def input_identity(path: Path) -> dict[str, Any]:
    """What identifies an input raster's content without reading it: path, size and modification time."""
    st = os.stat(path)
    return {"path": str(Path(path).absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def output_fingerprint(cfg: PipelineConfig) -> str:
    """Fingerprint of everything that decides a run's outputs: input, model, settings and geoseg version.

    Where and how the work runs (cluster, batch concurrency, output folder) is left out, so moving a nightly
    batch to another cluster does not redo finished scenes.
    """
    return _fingerprint(cfg, lambda section: section not in _NOT_OUTPUT)


def work_fingerprint(cfg: PipelineConfig) -> str:
    """Fingerprint of what decides the scratch stores: a work folder is resumed only when this matches."""
    return _fingerprint(cfg, lambda section: section in _WORK)


def _fingerprint(cfg: PipelineConfig, keep: Callable[[str], bool]) -> str:
    """Digest of the geoseg version, the input's identity, the model's digest and the ``keep`` config sections."""
    config = {k: v for k, v in dump_config(cfg).items() if keep(k)}
    return _digest({"geoseg": __version__, "input": input_identity(cfg.input), "model": model_digest(cfg.model),
                    "config": config})


class WorkDir:
    """A run's scratch folder with its completion markers."""

    def __init__(self, out_dir: Path, fingerprint: str):
        self.path = Path(out_dir) / WORK_DIR
        self.fingerprint = fingerprint
        self.markers = self.path / "done"

    def open(self) -> bool:
        """Create the folder, or reuse it when it holds this run's work; return whether work was resumed."""
        state = self.path / "work.json"
        try:
            resumed = json.loads(state.read_text()).get("fingerprint") == self.fingerprint
        except (OSError, ValueError):
            resumed = False
        if not resumed:
            remove(self.path)  # stale scratch of another input, model or configuration
            self.markers.mkdir(parents=True)
            write_text_atomic(state, json.dumps({"fingerprint": self.fingerprint}) + "\n")
        return resumed

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
        pass
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

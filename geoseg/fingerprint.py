"""Fingerprints: digests of what decides a run's outputs, so finished work is recognised and never redone.

The fingerprint of an output is the geoseg version, the input's identity (path, size, modification time),
the model checkpoint's SHA-256 and the output-affecting settings. Where and how the work runs (cluster,
batch concurrency, output folder) is left out, so moving a nightly batch to another cluster does not redo
finished scenes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from geoseg._io import file_digest
from geoseg._version import __version__
from geoseg.config import PipelineConfig, dump_config

#: Config sections that cannot change what a run writes (where and how fast it runs, not what).
NOT_OUTPUT = ("input", "output_dir", "overwrite", "cluster", "batch")

_DIGESTS: dict[tuple[str, int, int], str] = {}


def model_digest(path: Path | str) -> str:
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


def digest(data: Any) -> str:
    """SHA-256 of the canonical JSON of ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def output_fingerprint(cfg: PipelineConfig) -> str:
    """Fingerprint of everything that decides a run's outputs: input, model, settings and geoseg version."""
    if cfg.input is None:
        raise ValueError("a fingerprint needs an input")
    config = {k: v for k, v in dump_config(cfg).items() if k not in NOT_OUTPUT}
    config["write"].pop("on_workers", None)  # where the outputs are written, not what they hold
    return digest({"geoseg": __version__, "input": input_identity(cfg.input), "model": model_digest(cfg.model),
                   "config": config})

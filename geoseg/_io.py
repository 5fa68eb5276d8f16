"""Atomic output: write under a temporary name beside the target, then rename.

A crash, Ctrl-C or full disk leaves at most a ``.NAME.tmp-PID`` file, never something that looks like a
finished output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from geoseg.errors import OutputExistsError


def check_overwrite(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists and won't be overwritten without --overwrite")


def temporary_name(path: Path) -> Path:
    """``.NAME.tmp-PID.EXT`` beside ``path``: hidden, and GDAL still knows the format by its extension."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it onto ``path`` when the block succeeds."""
    path = Path(path)
    check_overwrite(path, overwrite)
    tmp = temporary_name(path)
    remove(tmp)
    try:
        yield tmp
        if path.is_dir():
            remove(path)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename."""
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

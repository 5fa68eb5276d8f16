"""The config base class and what every config model shares: frozen values, paths found from their types."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict


class _Config(BaseModel):
    """Base: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def existing_file(path: Path) -> Path:
    """``path`` when it is a file; a ValueError naming it otherwise (pydantic turns it into a key error)."""
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if path.is_dir():
        raise ValueError(f"is a directory, expected a file: {path}")
    return path


def _options(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (``X | None``), or the annotation alone."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _field_kind(annotation: Any) -> tuple[str, Any]:
    """How a field holds paths: ``("path", None)``, ``("paths", None)``, ``("model", cls)``, ``("models", cls)``."""
    for option in _options(annotation):
        if option is Path:
            return "path", None
        if isinstance(option, type) and issubclass(option, BaseModel):
            return "model", option
        if typing.get_origin(option) in (list, tuple):
            args = typing.get_args(option)
            inner = args[0] if args else None
            if inner is Path:
                return "paths", None
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return "models", inner
    return "", None


def _absolute(value: Any, base: Path) -> Any:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    return str(Path(os.path.normpath(path.absolute())))


def resolve_paths(model: type[BaseModel], data: Any, base: Path) -> Any:
    """``data`` with every relative path of a ``Path``-typed field of ``model`` made absolute against ``base``.

    The fields are found from the models' annotations (``Path``, ``Path | None``, ``list[Path]``, nested
    models and lists of them), so a new path key is resolved without being listed anywhere.
    """
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        kind, sub = _field_kind(field.annotation)
        value = out[name]
        if kind == "path":
            out[name] = _absolute(value, base)
        elif kind == "paths" and isinstance(value, list):
            out[name] = [_absolute(v, base) for v in value]
        elif kind == "model":
            out[name] = resolve_paths(sub, value, base)
        elif kind == "models" and isinstance(value, list):
            out[name] = [resolve_paths(sub, v, base) for v in value]
    return out

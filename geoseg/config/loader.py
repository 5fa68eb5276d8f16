"""Loading configs: safe YAML, ``extends`` presets, ``--set`` overrides, then one validation at the edge.

Every problem becomes one :class:`~geoseg.errors.ConfigError` line that names the file and the dotted key,
e.g. ``landcover.yaml: tile.overlap: must be even (got 33); use 32 or 34``. Relative paths are resolved
against the folder of the YAML file that set them (a preset's against the preset's), found from the
models' ``Path``-typed fields, so a pipeline runs the same from any working directory.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from geoseg.config._base import resolve_paths
from geoseg.config.pipeline import PipelineConfig
from geoseg.errors import ConfigError

C = TypeVar("C", bound=BaseModel)

#: A config file is a few kilobytes; anything this large is not one.
MAX_YAML_BYTES = 1 << 20
#: Values a document may expand to once its aliases are followed (a "billion laughs" stops here).
MAX_YAML_VALUES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML 1.2 says keys are unique)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})", mark)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(data: Any, source: str) -> None:
    """Refuse documents whose aliases expand to more than :data:`MAX_YAML_VALUES` values."""
    count = 0
    stack = [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values; "
                              "is it an alias bomb? Write the values out")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def read_yaml(path: str | Path) -> dict:
    """Safely parse a YAML mapping; syntax errors name the line and column; size and aliases are bounded."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path.name}: {path.stat().st_size:,} bytes is too large for a config file "
                          f"(at most {MAX_YAML_BYTES:,}); is it a YAML file?")
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise ConfigError(f"{path.name}: is a binary file, not a YAML config")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not a text file (not UTF-8); expected a YAML config") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path.name}{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of keys at the top level, got {type(data).__name__}")
    _check_expansion(data, path.name)
    return data


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars or lists (``tile.size=256``, ``read.bands=[1,2]``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set tile.size=256")
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None  # noqa: S506
        except yaml.YAMLError:
            value = raw
        _check_expansion(value, f"--set {key.strip()}")
        parsed.append((key.strip(), value))
    return parsed


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the sub-model that ``loc`` points into (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            break
        annotation = fields[part].annotation
        args = getattr(annotation, "__args__", ()) or ()
        candidates = [annotation, *args]
        for arg in list(candidates):
            candidates += list(getattr(arg, "__args__", ()) or ())
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


_REPR = reprlib.Repr()  # attributes, not keywords: Python 3.10/3.11 take none
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 6, 6, 2


def _format_error(model: type[BaseModel], err: Any) -> str:
    loc = list(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return f"{key}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not loc:  # a check across keys: its message names them
        return msg
    if err["type"] not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {_REPR.repr(err['input'])})"  # bounded: the input may be huge
    return f"{key}: {msg}"


def validate(model: type[C], data: dict, source: str, base_dir: Path | None) -> C:
    """Validate ``data`` into ``model``; relative paths resolve against ``base_dir`` (default: the cwd).

    Errors become one ConfigError line naming ``source`` and the keys.
    """
    data = resolve_paths(model, data, Path(base_dir) if base_dir is not None else Path.cwd())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        parts = [_format_error(model, e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(parts)) from None


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_tree(path: Path, model: type[BaseModel] = PipelineConfig, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and the presets it names in ``extends`` (merged first, this file on top).

    A preset's relative paths are made absolute against the preset's own folder before the merge.
    """
    path = Path(path).resolve()  # normalised: sub/../a.yaml and a symlink to it are the same file
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"{_seen[-1].name}: extends: circular include ({chain})")
    data = read_yaml(path)
    bases = data.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path.name}: extends: expected a path or a list of paths to preset YAML files")
    merged: dict = {}
    for base in bases:
        base_path = Path(base).expanduser()
        base_path = base_path if base_path.is_absolute() else path.parent / base_path
        if not base_path.exists():
            raise ConfigError(f"{path.name}: extends: preset not found: {base_path}")
        layer = read_config_tree(base_path, model, (*_seen, path))
        merged = _merge(merged, resolve_paths(model, layer, base_path.resolve().parent))
    return _merge(merged, data)


def load_config(path: str | Path, overrides: Iterable[str] = (), model: type[C] = PipelineConfig) -> C:  # type: ignore[assignment]
    """Load and validate a YAML config (with its ``extends`` presets) and ``--set`` style overrides."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    data = read_config_tree(path, model)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return validate(model, data, path.name, path.parent.absolute())


def raster_config(raster: str | Path, overrides: Iterable[str] = (), base: str | Path | None = None) -> PipelineConfig:
    """The pipeline for one raster (``geoseg run SCENE.tif``), validated.

    ``base``'s settings (a pipeline YAML) or the shipped defaults, its input the raster, ``overrides`` on
    top, its output folder ``./RASTER-landcover`` unless one is given. Without ``model`` (in ``base`` or the
    overrides) it is a one-line error: a raster alone names no model.
    """
    from geoseg.config.defaults import DEFAULT_PIPELINE

    raster = Path(raster)
    where = str(base) if base is not None else "geoseg run"
    if base is not None:
        data, base_dir = read_config_tree(Path(base)), Path(base).absolute().parent
    else:
        data, base_dir = {k: dict(v) for k, v in DEFAULT_PIPELINE.items()}, Path.cwd()
    data["input"] = str(raster.absolute())
    data.setdefault("output_dir", str(Path.cwd() / f"{raster.stem}-landcover"))
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    if "model" not in data:
        raise ConfigError(f"--model: required with a raster SOURCE ({raster.name}); a .safetensors written by "
                          "geoseg train")
    return validate(PipelineConfig, data, where, base_dir)


def dump_config(cfg: BaseModel) -> dict:
    """Plain-JSON form of a resolved config (absolute paths as strings)."""
    return cfg.model_dump(mode="json")

"""The configuration reference (docs/config.md), generated from the models so it cannot drift."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from geoseg.config.pipeline import PipelineConfig
from geoseg.config.training import PretrainConfig, TrainConfig


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = text.replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    text = re.sub(r"[\w.]+\.(\w+Config)", r"\1", text)
    return text.replace(" | ", " or ")


def _walk(model: type[BaseModel], prefix: str) -> Iterable[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            doc = (annotation.__doc__ or "").strip().splitlines()
            yield key, "section", "", doc[0] if doc else ""
            yield from _walk(annotation, key + ".")
            continue
        inner = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "[]" if field.default_factory is list else ("{}" if field.default_factory is dict else "")
        else:
            default = repr(field.default)
        yield key, _type_name(annotation), default, field.description or ""
        for sub in inner:
            yield from _walk(sub, key + "[]." if "list" in _type_name(annotation) else key + ".")


def config_reference_markdown() -> str:
    """The configuration reference (docs/config.md), generated from the models."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `geoseg/config/` (`python -m geoseg.config > docs/config.md`); a test keeps it current.",
        "Relative paths are resolved against the folder of the YAML file. Any key can be overridden on the",
        "command line with `--set key.sub=value` (repeatable). Unknown keys are errors.",
        "",
        "A file may start with `extends: [preset.yaml, ...]`: the presets (e.g. `configs/cpu-fast.yaml`,",
        "`configs/legend-sample.yaml`) are merged first, then the file's own keys on top.",
        "",
    ]
    sections = (("Pipeline (`geoseg run`, `geoseg batch`)", PipelineConfig), ("Training (`geoseg train`)", TrainConfig),
                ("Pretraining (`geoseg pretrain`)", PretrainConfig))
    for title, model in sections:
        lines += [f"## {title}", "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, typ, default, desc in _walk(model, ""):
            lines.append(f"| `{key}` | {typ} | {default} | {desc} |".replace("| section |", "| *section* |"))
        lines.append("")
    return "\n".join(lines)

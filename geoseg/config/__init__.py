"""Typed pipeline and training configuration, validated once at the edge.

A leaf package: it imports no runtime module of geoseg (only :mod:`geoseg.errors` and the value modules
:mod:`geoseg.classes` and :mod:`geoseg.registry`), so every stage can import its config without cycles.

- :mod:`.pipeline`: one ``<Stage>Config`` per stage and the ``PipelineConfig`` that holds them
- :mod:`.training`: ``TrainConfig``, ``PretrainConfig`` and their sections
- :mod:`.loader`: YAML (safe, bounded), ``extends`` presets, ``--set`` overrides, one-line errors
- :mod:`.docs`: the generated reference, docs/config.md
"""

from geoseg.config.docs import config_reference_markdown
from geoseg.config.loader import (
    dump_config,
    load_config,
    parse_overrides,
    raster_config,
    read_config_tree,
    read_yaml,
    validate,
)
from geoseg.config.pipeline import (
    BatchConfig,
    ClusterConfig,
    EvaluateConfig,
    InferConfig,
    JobqueueConfig,
    PipelineConfig,
    ReadConfig,
    RefineConfig,
    SegmentConfig,
    StitchConfig,
    TileConfig,
    TLSConfig,
    VectorizeConfig,
    WriteConfig,
)
from geoseg.config.training import (
    AugmentConfig,
    BandConfig,
    ClassConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    PretrainConfig,
    SamplingConfig,
    SceneConfig,
    TrainConfig,
    UnlabelledSceneConfig,
    ValidationConfig,
    WindowConfig,
)

__all__ = [
    "AugmentConfig", "BandConfig", "BatchConfig", "ClassConfig", "ClusterConfig", "EvaluateConfig", "InferConfig",
    "JobqueueConfig", "LossConfig", "MaskConfig", "ModelConfig", "PipelineConfig", "PretrainConfig", "ReadConfig",
    "RefineConfig", "SamplingConfig", "SceneConfig", "SegmentConfig", "StitchConfig", "TLSConfig", "TileConfig",
    "TrainConfig",
    "UnlabelledSceneConfig", "ValidationConfig", "VectorizeConfig", "WindowConfig", "WriteConfig",
    "config_reference_markdown", "dump_config", "load_config", "parse_overrides", "raster_config", "read_config_tree",
    "read_yaml", "validate",
]

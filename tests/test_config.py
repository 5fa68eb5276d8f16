"""Pipeline config: validation errors name the file and key, overrides, paths, the generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from geoseg.config import PipelineConfig, config_reference_markdown, load_config, parse_overrides
from geoseg.errors import ConfigError
from geoseg.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pipeline_yaml(tmp_path, sample_scene, fcn_checkpoint):  # noqa: ANN001
    def make(extra: dict | None = None, text: str | None = None) -> Path:
        path = tmp_path / "pipe.yaml"
        if text is not None:
            path.write_text(text)
            return path
        data = {"input": str(sample_scene.image), "model": str(fcn_checkpoint), "output_dir": "out"}
        for key, value in (extra or {}).items():
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def error_of(path: Path, overrides=()) -> str:  # noqa: ANN001
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_config_resolves_relative_paths(pipeline_yaml):  # noqa: ANN001
    cfg = load_config(pipeline_yaml())
    assert isinstance(cfg, PipelineConfig)
    assert cfg.output_dir == pipeline_yaml().parent / "out"
    assert cfg.tile.size == 512 and cfg.tile.overlap == 64 and cfg.tile.chunk_tiles == 3


def test_unknown_key_suggests_closest(pipeline_yaml):  # noqa: ANN001
    msg = error_of(pipeline_yaml({"tile.overlapp": 32}))
    assert msg.startswith("pipe.yaml: tile.overlapp: unknown key; did you mean 'overlap'?")


def test_unknown_top_level_key(pipeline_yaml):  # noqa: ANN001
    assert "pipe.yaml: infr: unknown key; did you mean 'infer'?" in error_of(pipeline_yaml({"infr": {}}))


def test_wrong_type_names_key(pipeline_yaml):  # noqa: ANN001
    msg = error_of(pipeline_yaml({"infer.batch_size": "four"}))
    assert msg.startswith("pipe.yaml: infer.batch_size:") and "'four'" in msg


def test_zero_and_negative_sizes(pipeline_yaml):  # noqa: ANN001
    assert "tile.size" in error_of(pipeline_yaml({"tile.size": 0}))
    assert "infer.batch_size" in error_of(pipeline_yaml({"infer.batch_size": -2}))


def test_missing_input_file(pipeline_yaml, tmp_path):  # noqa: ANN001
    msg = error_of(pipeline_yaml({"input": str(tmp_path / "nope.tif")}))
    assert msg.startswith("pipe.yaml: input: file not found:") and "nope.tif" in msg


def test_missing_required_key(pipeline_yaml, tmp_path):  # noqa: ANN001
    path = tmp_path / "p.yaml"
    path.write_text("input: x.tif\n")
    assert "model: required key is missing" in error_of(path)


def test_odd_and_too_large_overlap(pipeline_yaml):  # noqa: ANN001
    assert "tile: overlap must be even (got 33); use 32 or 34" in error_of(pipeline_yaml({"tile.overlap": 33}))
    assert "more than half the tile size" in error_of(pipeline_yaml({"tile.overlap": 300}))


def test_tile_not_divisible_by_model_stride(tmp_path, sample_scene, unet_checkpoint):  # noqa: ANN001
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"input": str(sample_scene.image), "model": str(unet_checkpoint),
                                    "output_dir": "o", "tile": {"size": 500, "overlap": 32}}))
    assert error_of(path) == "p.yaml: tile.size: 500 is not divisible by the model's output stride 8; use 504 or 496"


def test_nodata_colliding_with_class_id(pipeline_yaml):  # noqa: ANN001
    assert "write.nodata: 3 is a class id of the model; use 255" in error_of(pipeline_yaml({"write.nodata": 3}))


def test_band_count_mismatch(pipeline_yaml):  # noqa: ANN001
    msg = error_of(pipeline_yaml({"read.bands": [1, 2, 3]}))
    assert "read.bands: selects 3 bands but the model expects 4 (blue, green, red, nir)" in msg


def test_yaml_syntax_error_has_line_and_column(pipeline_yaml):  # noqa: ANN001
    msg = error_of(pipeline_yaml(text="input: a.tif\ntile: {size: 3\n"))
    assert msg.startswith("pipe.yaml:3:1: YAML syntax error")


def test_yaml_is_loaded_safely(pipeline_yaml):  # noqa: ANN001
    msg = error_of(pipeline_yaml(text="input: !!python/object/apply:os.system ['echo pwned']\n"))
    assert "YAML" in msg


def test_overrides_set_any_key(pipeline_yaml):  # noqa: ANN001
    cfg = load_pipeline(pipeline_yaml(), ["tile.size=256", "tile.overlap=32", "read.bands=[4,3,2,1]",
                                          "write.confidence=float16"])
    assert (cfg.tile.size, cfg.tile.overlap, cfg.read.bands, cfg.write.confidence) == (256, 32, [4, 3, 2, 1],
                                                                                      "float16")


def test_override_errors(pipeline_yaml):  # noqa: ANN001
    assert "tile.sise: unknown key; did you mean 'size'?" in error_of(pipeline_yaml(), ["tile.sise=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["tile.size"])


def test_missing_config_file(tmp_path):  # noqa: ANN001
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_config_reference_is_current():
    """docs/config.md is generated from the models; regenerate with python -m geoseg.config."""
    assert (ROOT / "docs" / "config.md").read_text() == config_reference_markdown() + "\n"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("train-*.yaml")))
def test_shipped_training_configs_validate(name: str):
    """Every shipped training config (real data may be absent: its paths get stand-ins)."""
    from geoseg.config import TrainConfig, read_config_tree, validate

    data = read_config_tree(ROOT / "configs" / name)
    for scene in data["train"] + data.get("validation", {}).get("scenes", []):
        scene["image"] = scene["labels"] = str(ROOT / "pyproject.toml")
    if data["model"].get("encoder_weights"):  # the file geoseg pretrain makes
        data["model"]["encoder_weights"] = str(ROOT / "pyproject.toml")
    cfg = validate(TrainConfig, data, name, ROOT / "configs")
    assert len(cfg.classes) >= 2 and cfg.bands


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("pretrain-*.yaml")))
def test_shipped_pretraining_configs_validate(name: str):
    from geoseg.config import PretrainConfig, read_config_tree, validate

    data = read_config_tree(ROOT / "configs" / name)
    for scene in data["scenes"]:
        scene["image"] = str(ROOT / "pyproject.toml")
    cfg = validate(PretrainConfig, data, name, ROOT / "configs")
    assert cfg.bands and cfg.model.architecture != "fcn"


PIPELINE_PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                          if not p.name.startswith(("train-", "pretrain-", "model-", "legend-")))


@pytest.mark.parametrize("preset", [None, *PIPELINE_PRESETS])
def test_shipped_pipeline_and_presets_validate(preset: str | None):
    from geoseg.config import read_config_tree, read_yaml, validate
    from geoseg.config.loader import _merge

    raw = read_yaml(ROOT / "pipelines" / "landcover.yaml")
    if preset:
        raw = _merge(read_config_tree(ROOT / "configs" / preset), raw | {"cluster": {}})
    raw["input"] = raw["model"] = raw["evaluate"]["reference"] = str(ROOT / "pyproject.toml")
    validate(PipelineConfig, raw, "landcover.yaml", ROOT / "pipelines")


def test_extends_merges_presets_under_the_file(tmp_path, sample_scene, fcn_checkpoint):  # noqa: ANN001
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "fast.yaml").write_text("infer: {precision: bf16, batch_size: 2}\noutput_dir: out-from-preset\n")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"extends": ["presets/fast.yaml", str(ROOT / "configs" / "cpu-fast.yaml")],
                                    "input": str(sample_scene.image), "model": str(fcn_checkpoint),
                                    "infer": {"batch_size": 8}}))
    cfg = load_config(path)
    assert (cfg.infer.precision, cfg.infer.batch_size, cfg.infer.channels_last) == ("bf16", 8, True)
    assert cfg.output_dir == presets / "out-from-preset"  # relative to the preset that set it


def test_extends_errors(tmp_path):  # noqa: ANN001
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular include"):
        load_config(a)
    a.write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="a.yaml: extends: preset not found"):
        load_config(a)


def test_path_keys_are_found_from_their_types_also_in_presets(tmp_path, sample_scene, fcn_checkpoint):
    """ca_file/cert/key of a preset resolve against the preset's folder, like every Path-typed key."""
    presets = tmp_path / "presets"
    (presets / "certs").mkdir(parents=True)
    for name in ("ca.pem", "me.pem"):
        (presets / "certs" / name).write_text("-----BEGIN CERTIFICATE-----\n")
    (presets / "tls.yaml").write_text("cluster:\n  backend: address\n  address: tls://10.0.0.5:8786\n"
                                      "  tls: {ca_file: certs/ca.pem, cert: certs/me.pem}\n")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"extends": "presets/tls.yaml", "input": str(sample_scene.image),
                                    "model": str(fcn_checkpoint), "output_dir": "out"}))
    cfg = load_config(path)
    assert cfg.cluster.tls.ca_file == presets / "certs" / "ca.pem" and cfg.cluster.tls.cert == presets / "certs" / "me.pem"


def test_unknown_architecture_is_refused_when_the_training_config_loads(tmp_path, monkeypatch):
    """Before any training raster is read (they do not even exist here)."""
    import geoseg.training_data
    from geoseg.config import TrainConfig

    monkeypatch.setattr(geoseg.training_data, "load_regions", lambda cfg: pytest.fail("rasters were read"))
    (tmp_path / "a.tif").write_text("")
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({
        "output": "m.safetensors", "model": {"architecture": "unet3"}, "bands": [{"index": 1, "name": "b"}],
        "classes": [{"id": 1, "name": "a", "color": "#ff0000"}, {"id": 2, "name": "b", "color": "#00ff00"}],
        "train": [{"image": "a.tif", "labels": "a.tif"}], "validation": {"window": {"row_off": 1}}}))
    with pytest.raises(ConfigError, match=r"t.yaml: model.architecture: unknown architecture 'unet3'; available: unet"):
        load_config(path, model=TrainConfig)

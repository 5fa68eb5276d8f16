"""The domain guard: a warning with the numbers for input unlike the training data, silence on alike, strict refuses."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import rasterio
import yaml

from geoseg.config import TrainConfig, load_config
from geoseg.errors import InputError
from geoseg.models import read_model_spec
from geoseg.pipeline import run_pipeline
from geoseg.sample import BANDS, CLASSES, make_sample
from geoseg.train import train_model
from tests.conftest import SHARED_DATA, pipeline_config, write_raster

TILE = {"tile": {"size": 64, "overlap": 16}, "vectorize": {"enabled": False}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_scene):  # noqa: ANN001
    """A model trained (briefly) on the sample scene, as geoseg train writes it: with its training data's stats."""
    root = tmp_path_factory.mktemp("domain")
    data = {
        "output": str(root / "m.safetensors"),
        "model": {"architecture": "fcn", "encoder": "none", "arch_kwargs": {"depth": 3, "width": 8}},
        "bands": [{"index": i + 1, "name": b} for i, b in enumerate(BANDS)],
        "classes": [{**c, "codes": [c["id"]]} for c in CLASSES],
        "ignore_codes": [0],
        "train": [{"image": str(sample_scene.image), "labels": str(sample_scene.labels)}],
        "validation": {"window": {"row_off": 200, "height": 100}},
        "tile_size": 64, "batch_size": 4, "epochs": 1, "steps_per_epoch": 2, "seed": 0, "threads": 2,
    }
    (root / "t.yaml").write_text(yaml.safe_dump(data))
    return train_model(load_config(root / "t.yaml", model=TrainConfig)).checkpoint


def test_the_checkpoint_records_its_training_datas_dtype_and_range(trained):
    stats = read_model_spec(trained).provenance["training_data"]
    assert stats["dtype"] == "uint16" and len(stats["min"]) == len(stats["max"]) == 4
    assert all(0 < lo < hi <= 65535 for lo, hi in zip(stats["min"], stats["max"]))


def test_a_held_out_scene_of_the_same_kind_passes_silently(tmp_path, client, trained, caplog):  # noqa: ANN001
    other = make_sample(tmp_path / "other", 300, seed=11, width=340)
    cfg = pipeline_config(other.image, trained, tmp_path / "out", **TILE)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        result = run_pipeline(cfg, client=client)
    assert not [r for r in caplog.records if "unlike the data" in r.getMessage()]
    domain = json.loads(result.manifest.read_text())["domain"]
    assert domain["ok"] and domain["warnings"] == [] and domain["input"]["pixels"] > 50_000


def eight_bit_six_bands(tmp_path, sample_scene):  # noqa: ANN001, ANN201
    """The sample scene as an 8-bit, 6-band product (the shape of the shared Landsat scene)."""
    with rasterio.open(sample_scene.image) as src:
        data, profile = src.read(), src.profile
    small = np.clip(data // 40, 1, 255).astype("uint8")
    six = np.concatenate([small, small[:2]])
    return write_raster(tmp_path / "landsat-like.tif", six, crs=profile["crs"], transform=profile["transform"],
                        nodata=0)


def test_input_unlike_the_training_data_warns_once_with_the_numbers_and_is_recorded(tmp_path, client, trained,
                                                                                     sample_scene, caplog):  # noqa: ANN001
    scene = eight_bit_six_bands(tmp_path, sample_scene)
    cfg = pipeline_config(scene, trained, tmp_path / "out", **TILE)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        result = run_pipeline(cfg, client=client)
    lines = [r.getMessage() for r in caplog.records if "unlike the data" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "data type uint8, trained on uint16" in line
    assert "the raster has 6 bands and the model's 4 were picked by index" in line
    assert "values on another scale (10x or more): band means blue" in line
    domain = json.loads(result.manifest.read_text())["domain"]
    assert not domain["ok"] and len(domain["warnings"]) == 3 and domain["input"]["dtype"] == "uint8"
    item = json.loads((tmp_path / "out" / "item.json").read_text())
    assert item["properties"]["geoseg:domain_warnings"] == domain["warnings"]


def test_strict_refuses_it_in_one_line_before_any_work(tmp_path, client, trained, sample_scene):  # noqa: ANN001
    scene = eight_bit_six_bands(tmp_path, sample_scene)
    cfg = pipeline_config(scene, trained, tmp_path / "out", read={"strict": True}, **TILE)
    with pytest.raises(InputError, match=r"landsat-like.tif: unlike the data the model was trained on: data type "
                                         r"uint8.*\(read.strict: false to run anyway\)") as err:
        run_pipeline(cfg, client=client)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "landcover.tif").exists()


def test_a_band_shifted_by_many_deviations_is_named(tmp_path, client, trained, sample_scene):  # noqa: ANN001
    from geoseg.domain import check_domain
    from geoseg.read import read_raster

    with rasterio.open(sample_scene.image) as src:
        data, profile = src.read(), src.profile
    data[3] = np.where(data[3] > 0, 10000, 0)  # NIR bright everywhere: 4x the mean, many deviations off
    scene = write_raster(tmp_path / "nir.tif", data, crs=profile["crs"], transform=profile["transform"], nodata=0)
    spec = read_model_spec(trained)
    cfg = pipeline_config(scene, trained, tmp_path / "out", **TILE)
    with rasterio.open(scene) as src:
        report = check_domain(read_raster(scene, cfg.read, spec), spec, src, explicit_bands=False)
    assert len(report.warnings) == 1 and report.warnings[0].startswith("band means far from training: nir 1e+04 is")


@pytest.mark.real_data
def test_the_shared_landsat_scene_is_flagged_for_a_model_of_the_sample_scenes(trained):
    from geoseg.config import ReadConfig
    from geoseg.domain import check_domain
    from geoseg.read import read_raster

    path = SHARED_DATA / "nc-landsat7" / "scene.tif"
    if not path.exists():
        pytest.skip(f"real imagery not available: {path} is absent (see ../shared/data/README.md)")
    spec = read_model_spec(trained)
    with rasterio.open(path) as src:
        report = check_domain(read_raster(path, ReadConfig(), spec), spec, src, explicit_bands=False)
    assert any("data type uint8, trained on uint16" in w for w in report.warnings), report.warnings
    assert any("6 bands and the model's 4 were picked by index" in w for w in report.warnings)

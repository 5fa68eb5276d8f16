"""`geoseg pretrain`: masked-image modelling that learns, writes an encoder file train loads, never reads past its window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from geoseg.cli.main import main
from geoseg.config import PretrainConfig, load_config
from geoseg.errors import ConfigError, InputError
from geoseg.models import create_model
from geoseg.pretrain import load_unlabelled, masked_l1, patch_mask, pretrain_encoder, read_record
from geoseg.sample import BANDS
from geoseg.transfer import load_encoder_weights
from tests.conftest import write_raster

UNET = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


@pytest.fixture
def pretrain_yaml(tmp_path, sample_scene):  # noqa: ANN001
    def make(**extra) -> tuple:  # noqa: ANN003
        data = {
            "output": str(tmp_path / "enc.safetensors"),
            "model": {"architecture": "unet", "encoder": "resnet18", "arch_kwargs": UNET},
            "bands": [{"index": i + 1, "name": b} for i, b in enumerate(BANDS)],
            "scenes": [{"image": str(sample_scene.image), "window": {"row_off": 0, "height": 200}}],
            "tile_size": 32, "batch_size": 8, "epochs": 3, "steps_per_epoch": 8, "lr": 0.003, "seed": 1,
            "threads": 2, "mask": {"patch": 4, "ratio": 0.5},
        }
        data.update(extra)
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(data))
        return path, load_config(path, model=PretrainConfig)

    return make


def test_the_mask_covers_the_ratio_of_whole_patches():
    m = patch_mask(5, 30, 4, 0.5, np.random.default_rng(0))
    assert m.shape == (5, 30, 30)
    cells = m[:, ::4, ::4]  # 8 x 8 patches, the last ones cut to 2 px by the window's edge
    assert (cells.reshape(5, -1).sum(1) == 32).all()
    assert all((m[i, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] == cells[i, r, c]).all()
               for i in range(5) for r in range(8) for c in range(8))
    assert not np.array_equal(m[0], m[1])


def test_the_loss_counts_only_masked_valid_pixels():
    x = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    pred[0, :, 0, 0] = 3.0  # wrong where masked
    pred[0, :, 3, 3] = 100.0  # wrong where not masked: no part in the loss
    weight = torch.zeros(1, 4, 4, dtype=torch.bool)
    weight[0, 0, :2] = True
    assert float(masked_l1(pred, x, weight)) == pytest.approx(3.0 / 2)


def test_only_the_window_is_read_and_nodata_is_never_a_target(tmp_path, pretrain_yaml):  # noqa: ANN001
    data = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    data[:, 5:8, 5:9] = 0
    image = write_raster(tmp_path / "u.tif", data, nodata=0)
    _, cfg = pretrain_yaml(bands=[{"index": 1, "name": "a"}, {"index": 3, "name": "c"}],
                           scenes=[{"image": str(image), "window": {"row_off": 2, "col_off": 3, "height": 20}}])
    (region,) = load_unlabelled(cfg)
    assert region.image.shape == (2, 20, 47)
    assert np.array_equal(region.image[1], data[2, 2:22, 3:].astype(np.float32))
    assert not region.trainable[3:6, 2:6].any() and region.trainable.sum() == 20 * 47 - 12
    _, too_many = pretrain_yaml(bands=[{"index": 4, "name": "d"}], scenes=[{"image": str(image)}])
    with pytest.raises(InputError, match="has 3 bands but bands\\[\\] asks for band 4"):
        load_unlabelled(too_many)


def test_pretraining_learns_and_writes_an_encoder_train_loads(pretrain_yaml):  # noqa: ANN001
    _, cfg = pretrain_yaml()
    result = pretrain_encoder(cfg)
    probe = [h["probe_l1"] for h in result.history]
    # it learns to fill masked patches in: better than the band means, which an untrained network can't beat
    assert probe[-1] < 0.8 * result.baseline_error < probe[0], (probe, result.baseline_error)
    record = read_record(result.encoder)
    assert record["encoder"] == "resnet18" and [b["name"] for b in record["bands"]] == BANDS
    assert record["probe_l1"] == probe and record["data"][0]["window"]["height"] == 200
    torch.manual_seed(7)
    target = create_model("unet", "resnet18", 4, 5, **UNET)
    done = load_encoder_weights(target, result.encoder)
    assert done.layout == "smp encoder" and not done.adapted
    written = load_file(str(result.encoder))
    assert all(torch.equal(v, written[k]) for k, v in target.encoder.state_dict().items())


def test_the_cli_writes_once_reproducibly_and_refuses_an_fcn(pretrain_yaml, capsys):  # noqa: ANN001
    path, cfg = pretrain_yaml(epochs=1, steps_per_epoch=2)
    assert main(["pretrain", str(path), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"wrote {cfg.output} (masked-pixel L1") and "model.encoder_weights" in err
    before = cfg.output.read_bytes()
    assert main(["pretrain", str(path), "-q"]) == 1
    assert "exists and won't be overwritten without --overwrite" in capsys.readouterr().err
    assert cfg.output.read_bytes() == before
    first = load_file(str(cfg.output))
    assert main(["pretrain", str(path), "-q", "--overwrite"]) == 0  # the same seed: the same tensors
    assert all(torch.equal(v, first[k]) for k, v in load_file(str(cfg.output)).items())
    with pytest.raises(ConfigError, match="the fcn has no encoder to pretrain"):
        pretrain_yaml(model={"architecture": "fcn", "encoder": "none"})

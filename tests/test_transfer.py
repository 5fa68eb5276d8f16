"""Encoder weights users bring as files: smp, torchvision and timm layouts, the first layer adapted to the bands."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from geoseg.errors import CheckpointError
from geoseg.models import create_model, load_checkpoint
from geoseg.transfer import adapt_first_conv, load_encoder_weights
from tests.conftest import make_checkpoint

UNET = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def unet(bands: int, seed: int, encoder: str = "resnet18") -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("unet", encoder, bands, 5, **UNET)


def same_encoder(a: torch.nn.Module, b: torch.nn.Module, skip: str = "") -> bool:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k != skip)


def test_an_smp_encoder_file_loads_exactly(tmp_path):
    source = unet(4, seed=1)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    target = unet(4, seed=2)
    assert not same_encoder(source, target)
    done = load_encoder_weights(target, path)
    assert done.layout == "smp encoder" and not done.adapted and same_encoder(source, target)


def test_a_torchvision_classifier_loads_with_its_head_dropped_and_its_first_layer_adapted(tmp_path):
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    target = unet(6, seed=2)
    done = load_encoder_weights(target, path)
    assert done.adapted == ("conv1.weight",) and set(done.dropped) == {"fc.weight", "fc.bias"}
    rgb, six = resnet.conv1.weight.detach(), target.encoder.conv1.weight.detach()
    # band k gets RGB filter k mod 3, scaled by 3/6 (smp's rule for in_channels != 3)
    assert torch.allclose(six, torch.cat([rgb, rgb], 1) * 0.5)
    assert torch.equal(target.encoder.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    one = unet(1, seed=3)
    load_encoder_weights(one, path)
    assert torch.allclose(one.encoder.conv1.weight, rgb.sum(1, keepdim=True))


def test_a_timm_model_loads_into_a_timm_encoder_and_a_wrapped_smp_model_too(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    torch.manual_seed(1)
    target = create_model("unet", "tu-resnet18", 3, 5)
    done = load_encoder_weights(target, path)
    assert done.layout == "timm model for a tu- encoder"
    assert torch.equal(target.encoder.model.conv1.weight, net.conv1.weight)
    # a whole smp model saved by a training framework: {"state_dict": {"module.encoder....": ...}}
    source = unet(4, seed=5)
    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    target = unet(4, seed=6)
    load_encoder_weights(target, wrapped)
    assert same_encoder(source, target)


def test_a_geoseg_checkpoint_gives_its_encoder(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors", architecture="unet", encoder="resnet18", arch_kwargs=UNET)
    _, state = load_checkpoint(ckpt)
    target = unet(4, seed=9)
    done = load_encoder_weights(target, ckpt)
    assert done.layout == "smp model or geoseg checkpoint"
    assert all(torch.equal(target.encoder.state_dict()[k], state[f"encoder.{k}"]) for k in target.encoder.state_dict())


def test_weights_of_another_network_are_a_one_line_error_naming_keys_and_layout(tmp_path):
    import torchvision

    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_encoder_weights(unet(4, seed=0), path)
    line = str(err.value)
    assert "\n" not in line and "resnet34.pth: not encoder weights for this encoder" in line
    assert "looked like the smp encoder layout" in line and "unexpected (first: layer1.2." in line
    other = tmp_path / "other.safetensors"
    save_file({"backbone.stem.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(CheckpointError, match=r"missing \(first: conv1.weight"):
        load_encoder_weights(unet(4, seed=0), other)


def test_a_pickle_carrying_code_is_refused(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("ran code from a weights file",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Boom()}))
    with pytest.raises(CheckpointError, match="not a state dict that loads without running code"):
        load_encoder_weights(unet(4, seed=0), path)


def test_adapting_three_bands_to_three_is_the_identity():
    w = torch.randn(8, 3, 7, 7)
    assert torch.equal(adapt_first_conv(w, 3), w)
    assert adapt_first_conv(w, 4)[:, 3].equal(w[:, 0] * 0.75)


def test_training_starts_from_the_file_and_records_it(tmp_path, sample_scene):
    import yaml

    from geoseg.config import TrainConfig, load_config
    from geoseg.sample import BANDS, CLASSES
    from geoseg.train import train_model

    source = unet(4, seed=1)
    weights = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(weights))
    data = {
        "output": str(tmp_path / "m.safetensors"),
        "model": {"architecture": "unet", "encoder": "resnet18", "arch_kwargs": UNET, "encoder_weights": "enc.safetensors"},
        "bands": [{"index": i + 1, "name": b} for i, b in enumerate(BANDS)],
        "classes": [{**c, "codes": [c["id"]]} for c in CLASSES],
        "ignore_codes": [0],
        "train": [{"image": str(sample_scene.image), "labels": str(sample_scene.labels)}],
        "validation": {"window": {"row_off": 200, "height": 100}},
        "tile_size": 64, "batch_size": 4, "epochs": 1, "steps_per_epoch": 1, "lr": 1e-9, "seed": 3, "threads": 2,
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    result = train_model(load_config(tmp_path / "t.yaml", model=TrainConfig))
    spec, state = load_checkpoint(result.checkpoint)
    record = spec.provenance["encoder_weights"]
    assert record["path"] == str(weights) and record["layout"] == "smp encoder" and len(record["sha256"]) == 64
    # one step at a learning rate of 1e-9: the convolutions are still the file's
    assert torch.allclose(state["encoder.layer1.0.conv1.weight"], source.encoder.layer1[0].conv1.weight, atol=1e-6)


def train_config(tmp_path, sample_scene, **extra):  # noqa: ANN001, ANN003, ANN201
    import yaml

    from geoseg.config import TrainConfig, load_config
    from geoseg.sample import BANDS, CLASSES

    data = {
        "output": str(tmp_path / "tuned.safetensors"),
        "model": {"architecture": "unet", "encoder": "resnet18", "arch_kwargs": UNET},
        "bands": [{"index": i + 1, "name": b} for i, b in enumerate(BANDS)],
        "classes": [{**c, "codes": [c["id"]]} for c in CLASSES],
        "ignore_codes": [0],
        "train": [{"image": str(sample_scene.image), "labels": str(sample_scene.labels)}],
        "validation": {"window": {"row_off": 200, "height": 100}},
        "tile_size": 64, "batch_size": 4, "epochs": 1, "steps_per_epoch": 2, "lr": 0.01, "seed": 3, "threads": 2,
        **extra,
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path, model=TrainConfig)


def test_init_keeps_shared_classes_and_bands_and_starts_new_ones_fresh(tmp_path):
    from geoseg.transfer import init_from_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.safetensors", architecture="unet", encoder="resnet18", arch_kwargs=UNET)
    spec, old = load_checkpoint(ckpt)
    torch.manual_seed(7)
    model = create_model("unet", "resnet18", 4, 6, **UNET)  # bands: green, red, nir and a new swir; class 6 -> 99
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    record = init_from_checkpoint(model, ckpt, ["green", "red", "nir", "swir"], [1, 2, 3, 4, 5, 99])
    new = model.state_dict()
    assert record["classes_kept"] == [1, 2, 3, 4, 5] and record["classes_new"] == [99]
    assert record["bands_kept"] == ["green", "red", "nir"] and record["adapted"] == ["encoder.conv1.weight"]
    conv, was = new["encoder.conv1.weight"], old["encoder.conv1.weight"]
    assert torch.equal(conv[:, :3], was[:, 1:4]) and not conv[:, 3].any()  # matched by name; swir starts at 0
    head = "segmentation_head.0.weight"
    assert torch.equal(new[head][:5], old[head][:5]) and torch.equal(new[head][5], fresh[head][5])
    same = [k for k in new if k not in (head, "segmentation_head.0.bias", "encoder.conv1.weight")]
    assert all(torch.equal(new[k], old[k]) for k in same)


def test_init_from_another_network_is_a_one_line_error(tmp_path, sample_scene):
    from geoseg.errors import ConfigError
    from geoseg.train import train_model

    ckpt = make_checkpoint(tmp_path / "fcn.safetensors")
    _, cfg = train_config(tmp_path, sample_scene, init=str(ckpt))
    with pytest.raises(ConfigError, match=r"init: .*fcn.safetensors is a fcn/none model .*set model.architecture"):
        train_model(cfg)


def test_geoseg_train_init_fine_tunes_with_the_encoder_frozen_first(tmp_path, sample_scene):
    from geoseg.cli.main import main

    ckpt = make_checkpoint(tmp_path / "m.safetensors", architecture="unet", encoder="resnet18", arch_kwargs=UNET)
    _, old = load_checkpoint(ckpt)
    path, _ = train_config(tmp_path, sample_scene, freeze_encoder_epochs=1)
    assert main(["train", str(path), "--init", str(ckpt)]) == 0
    spec, new = load_checkpoint(tmp_path / "tuned.safetensors")
    assert spec.provenance["init"]["path"] == str(ckpt) and spec.provenance["init"]["classes_new"] == []
    encoder = [k for k in new if k.startswith("encoder.")]
    assert all(torch.equal(new[k], old[k]) for k in encoder)  # weights and batch-norm statistics
    assert not all(torch.equal(new[k], old[k]) for k in new if k.startswith("decoder."))


def test_a_lower_encoder_learning_rate_is_its_own_parameter_group(tmp_path, sample_scene):
    from geoseg.train import _param_groups, _schedule

    _, cfg = train_config(tmp_path, sample_scene, encoder_lr_factor=0.1)
    model = unet(4, seed=0)
    groups = _param_groups(model, cfg)
    assert [g["lr"] for g in groups] == [pytest.approx(0.001), 0.01]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    _schedule(opt, cfg)
    assert [g["max_lr"] for g in opt.param_groups] == [pytest.approx(0.001), 0.01]

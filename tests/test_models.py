"""Model registry and self-describing, code-free checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from geoseg.errors import CheckpointError
from geoseg.models import ARCHITECTURES, build_model, create_model, load_checkpoint, read_model_spec
from tests.conftest import make_checkpoint


class ArchitectureContract:
    """Every registered architecture builds, runs on a tile and round-trips through a checkpoint."""

    architecture = ""
    encoder = "resnet18"
    kwargs: dict = {}

    def test_round_trip_gives_identical_outputs(self, tmp_path):  # noqa: ANN001
        path = make_checkpoint(tmp_path / "m.safetensors", architecture=self.architecture, encoder=self.encoder,
                               arch_kwargs=self.kwargs)
        spec, state = load_checkpoint(path)
        assert spec.architecture == self.architecture and spec.in_channels == 4 and len(spec.classes) == 6
        torch.manual_seed(0)
        original = create_model(self.architecture, self.encoder, 4, 6, **self.kwargs).eval()
        restored = build_model(spec, state)
        x = torch.randn(1, 4, 64, 64)
        with torch.inference_mode():
            assert torch.equal(original(x), restored(x))


class TestUnet(ArchitectureContract):
    architecture = "unet"
    kwargs = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


class TestFPN(ArchitectureContract):
    architecture = "fpn"
    kwargs = {"encoder_depth": 3, "decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}


class TestSegformer(ArchitectureContract):
    architecture = "segformer"
    kwargs = {"decoder_segmentation_channels": 16}


class TestPixelFCN(ArchitectureContract):
    architecture = "fcn"
    encoder = "none"
    kwargs = {"depth": 3, "width": 8}


def test_registry_covers_the_required_architectures():
    assert {"unet", "unetplusplus", "fpn", "deeplabv3plus", "segformer"} <= set(ARCHITECTURES)


def test_unknown_architecture_lists_choices():
    with pytest.raises(CheckpointError, match=r"unknown architecture 'unet3'; available: unet, unetplusplus, fpn"):
        create_model("unet3", "resnet18", 4, 2)


def test_unknown_encoder_suggests_names():
    with pytest.raises(CheckpointError, match=r"unknown encoder 'resnet19'; e.g. resnet18"):
        create_model("unet", "resnet19", 4, 2)


def test_spec_is_readable_without_weights(fcn_checkpoint):  # noqa: ANN001
    spec = read_model_spec(fcn_checkpoint)
    assert [b["name"] for b in spec.bands] == ["blue", "green", "red", "nir"]
    assert spec.class_map.names[0] == "water" and spec.mean == [900.0] * 4 and spec.output_stride == 1


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path):  # noqa: ANN001
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"geoseg": "{}", "state_dict": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused: the file is a pickle that needs code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_weights_only_torch_checkpoint_is_accepted(tmp_path, fcn_checkpoint):  # noqa: ANN001
    spec, state = load_checkpoint(fcn_checkpoint)
    path = tmp_path / "legacy.pt"
    torch.save({"geoseg": spec.to_json(), "state_dict": state}, path)
    spec2, state2 = load_checkpoint(path)
    assert spec2 == spec and all(torch.equal(state[k], state2[k]) for k in state)


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x00" * 64])
def test_garbage_is_not_a_checkpoint(tmp_path, content):  # noqa: ANN001
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a geoseg checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path, fcn_checkpoint):  # noqa: ANN001
    path = tmp_path / "cut.safetensors"
    path.write_bytes(fcn_checkpoint.read_bytes()[:-200])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_checkpoint_and_directory(tmp_path):  # noqa: ANN001
    with pytest.raises(CheckpointError, match="model checkpoint not found"):
        load_checkpoint(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_safetensors_without_geoseg_header(tmp_path):  # noqa: ANN001
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="has no geoseg header"):
        load_checkpoint(path)


def test_checkpoint_predictions_identical_after_reload(fcn_checkpoint):  # noqa: ANN001
    a = build_model(*load_checkpoint(fcn_checkpoint))
    b = build_model(*load_checkpoint(fcn_checkpoint))
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 4, 40, 40)).astype(np.float32))
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))

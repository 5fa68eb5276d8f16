"""Model registry and self-describing, code-free checkpoints."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from geoseg.errors import CheckpointError
from geoseg.models import build_model, create_model, load_checkpoint, output_stride, read_model_spec
from geoseg.registry import ARCHITECTURES
from tests.conftest import make_checkpoint


class ArchitectureContract:
    """What every registered architecture must do (smp's ``BaseModelTester`` is the model).

    Build for 1, 3, 4 and 6 bands and run a tile of a size its output stride allows with the expected output
    shape, train one step, report that stride in the checkpoint header as the built network has it,
    round-trip through a checkpoint unchanged, and run tiled through the pipeline on its own grid.
    """

    architecture = ""
    encoder = "resnet18"
    kwargs: dict = {}
    stride = 32
    """The output stride smp's encoder really has (not 2 ** depth: dilated encoders keep 16 or 8)."""
    min_side = 64
    """Smallest tile the network runs on (PAN's pyramid attention pools its deepest features 8x more)."""
    local = False
    """Whether a pixel's score depends only on a neighbourhood (convolutions, batch norm in eval mode), so a
    tile with a halo wider than that gives the full frame's classes. False for networks with image-wide
    operations: pooling over the whole input (PSPNet's pyramid, ASPP's image pooling, scSE's channel
    squeeze), attention (Segformer, MAnet, PAN), group norm over the feature map (FPN): their tile is their
    context, as it is in training."""

    @pytest.mark.parametrize("bands", [1, 3, 4, 6])
    def test_builds_and_gives_one_score_per_class_and_pixel(self, bands):
        model = create_model(self.architecture, self.encoder, bands, 6, **self.kwargs).eval()
        side = max(self.min_side, 2 * self.stride)
        with torch.inference_mode():
            out = model(torch.randn(2, bands, side, side + self.stride))
        assert out.shape == (2, 6, side, side + self.stride)

    def test_trains_one_step(self):
        torch.manual_seed(0)
        model = create_model(self.architecture, self.encoder, 4, 6, **self.kwargs).train()
        side = max(self.min_side, 2 * self.stride)
        x, y = torch.randn(2, 4, side, side), torch.randint(0, 6, (2, side, side))
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        # the gradient reaches the first layer (smp keeps encoder stages past encoder_depth unused), and the
        # step moved the weights
        params = list(model.parameters())
        assert params[0].grad is not None and params[0].grad.abs().sum() > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, params))

    def test_output_stride_is_the_networks_own(self, tmp_path):
        model = create_model(self.architecture, self.encoder, 4, 6, **self.kwargs)
        assert output_stride(model) == self.stride
        spec = read_model_spec(make_checkpoint(tmp_path / "m.safetensors", architecture=self.architecture,
                                               encoder=self.encoder, arch_kwargs=self.kwargs))
        assert spec.output_stride == self.stride

    def test_round_trip_gives_identical_outputs(self, tmp_path):
        path = make_checkpoint(tmp_path / "m.safetensors", architecture=self.architecture, encoder=self.encoder,
                               arch_kwargs=self.kwargs)
        spec, state = load_checkpoint(path)
        assert spec.architecture == self.architecture and spec.in_channels == 4 and len(spec.classes) == 6
        torch.manual_seed(0)
        original = create_model(self.architecture, self.encoder, 4, 6, **self.kwargs).eval()
        restored = build_model(spec, state)
        x = torch.randn(1, 4, self.min_side, self.min_side)
        with torch.inference_mode():
            assert torch.equal(original(x), restored(x))

    def test_tiled_gives_the_full_frames_classes_on_the_interior(self, tmp_path):
        """Tiled in memory exactly as ``geoseg run`` tiles, with a halo wider than the receptive field.

        The receptive field is measured (the input pixels the gradient of the centre pixel reaches); a local
        network then gives the full frame's classes exactly on the interior. A network with image-wide
        operations reaches the whole input, and is only checked to run tiled (``local`` says which is which).
        """
        from geoseg.config import SegmentConfig
        from geoseg.segment import predict_array

        path = make_checkpoint(tmp_path / "m.safetensors", architecture=self.architecture, encoder=self.encoder,
                               arch_kwargs=self.kwargs)
        spec, state = load_checkpoint(path)
        model = build_model(spec, state).eval()
        probe = 192  # wider than every local network's field (Unet: 65 px each way)
        x = torch.randn(1, 4, probe, probe, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        model(x)[0, :, probe // 2, probe // 2].sum().backward()
        rows, cols = torch.nonzero(x.grad.abs().sum((0, 1)) > 0, as_tuple=True)
        field = int(max(probe // 2 - rows.min(), rows.max() - probe // 2, probe // 2 - cols.min(),
                        cols.max() - probe // 2))
        assert (field < probe // 2) == self.local, f"receptive field radius {field} px"
        # crop blending: each pixel from the tile whose core holds it, with ``halo`` pixels of context
        halo = -(-(field + 1) // self.stride) * self.stride if self.local else self.stride
        size = max(self.min_side, 4 * halo)  # the overlap (twice the halo) may be half the tile at most
        cfg = SegmentConfig(model=path, tile={"size": size, "overlap": 2 * halo}, stitch={"blend": "crop"})
        h, w = size + 6 * self.stride, size + 4 * self.stride  # full frame: the network's stride divides it
        image = np.random.default_rng(0).normal(size=(4, h, w)).astype(np.float32)

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(batch))), 1).numpy()

        tiled = predict_array(predict, image, np.ones((h, w), bool), spec, cfg)
        assert tiled.shape == (h, w) and tiled.min() >= 0 and tiled.max() < 6
        if self.local:
            with torch.inference_mode():
                full = model(torch.from_numpy(image)[None]).argmax(1)[0].numpy()
            inner = (slice(halo, -halo), slice(halo, -halo))
            assert np.array_equal(tiled[inner], full[inner])


class TestUnet(ArchitectureContract):
    architecture = "unet"
    local = True
    kwargs = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    stride = 8


class TestUnetPlusPlus(ArchitectureContract):
    architecture = "unetplusplus"
    local = True
    kwargs = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    stride = 8


class TestFPN(ArchitectureContract):
    architecture = "fpn"
    # FPN's head upsamples 4x, right for depth 5 only: with depth 3 its output would be 4x the input
    kwargs = {"encoder_depth": 3, "upsampling": 1, "decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}
    stride = 8


class TestUnetSCSE(ArchitectureContract):
    """Unet with scSE attention in its decoder blocks (Roy et al. 2018; smp's decoder_attention_type)."""

    architecture = "unet"
    kwargs = {"encoder_depth": 3, "decoder_channels": [32, 16, 16], "decoder_attention_type": "scse"}
    stride = 8


class TestUnetPlusPlusSCSE(ArchitectureContract):
    architecture = "unetplusplus"
    kwargs = {"encoder_depth": 3, "decoder_channels": [32, 16, 16], "decoder_attention_type": "scse"}
    stride = 8


class TestPSPNet(ArchitectureContract):
    architecture = "pspnet"
    kwargs = {"psp_out_channels": 32}
    stride = 8  # encoder_depth 3, smp's default


class TestPSPNetDeep(ArchitectureContract):
    """All five encoder stages: the head upsamples 32x (smp's default 8 would leave the scores 4x too small)."""

    architecture = "pspnet"
    kwargs = {"encoder_depth": 5, "psp_out_channels": 32}
    stride = 32


class TestDeepLabV3(ArchitectureContract):
    architecture = "deeplabv3"
    kwargs = {"decoder_channels": 32}
    stride = 8  # dilated to smp's default encoder_output_stride


class TestDeepLabV3Stride16(ArchitectureContract):
    architecture = "deeplabv3"
    kwargs = {"decoder_channels": 32, "encoder_output_stride": 16}
    stride = 16


class TestDeepLabV3Plus(ArchitectureContract):
    architecture = "deeplabv3plus"
    kwargs = {"decoder_channels": 32}
    stride = 16  # dilated: depth 5 would guess 32


class TestSegformer(ArchitectureContract):
    architecture = "segformer"
    kwargs = {"decoder_segmentation_channels": 16}


class TestLinknet(ArchitectureContract):
    architecture = "linknet"
    local = True
    kwargs = {"encoder_depth": 3}
    stride = 8


class TestMAnet(ArchitectureContract):
    architecture = "manet"
    kwargs = {"encoder_depth": 3, "decoder_channels": [16, 8, 8], "decoder_pab_channels": 8}
    stride = 8


class TestPAN(ArchitectureContract):
    architecture = "pan"
    kwargs = {"decoder_channels": 16}
    stride = 16
    min_side = 128


class TestUPerNet(ArchitectureContract):
    architecture = "upernet"
    kwargs = {"decoder_channels": 16}


class TestPixelFCN(ArchitectureContract):
    architecture = "fcn"
    local = True
    encoder = "none"
    kwargs = {"depth": 3, "width": 8}
    stride = 1


def test_a_head_upsampling_that_misses_the_encoders_stride_is_refused_not_cropped(tmp_path):
    # PSPNet with five encoder stages and smp's default upsampling of 8 gives scores 1/4 of the tile
    with pytest.raises(CheckpointError, match="scores must cover the tile pixel for pixel"):
        create_model("pspnet", "resnet18", 4, 6, encoder_depth=5, upsampling=8)
    spec = read_model_spec(make_checkpoint(tmp_path / "m.safetensors", architecture="deeplabv3",
                                           encoder="resnet18", arch_kwargs={"decoder_channels": 8}))
    with pytest.raises(ValueError, match="encoder_output_stride: 32 is not 8 or 16"):
        type(spec).model_validate({**spec.model_dump(), "arch_kwargs": {"encoder_output_stride": 32}})


def test_a_network_whose_output_is_not_the_input_size_is_refused():
    with pytest.raises(CheckpointError, match=r"fpn/resnet18: gives 512 x 512 scores for a 128 x 128 tile; .* set upsampling: 2 \*\* \(d - 3\)"):
        create_model("fpn", "resnet18", 4, 6, encoder_depth=3)


def test_every_registered_architecture_has_its_contract_test():
    tested = {cls.architecture for cls in ArchitectureContract.__subclasses__()}
    assert tested == set(ARCHITECTURES)


def test_a_dilated_model_takes_tiles_of_its_real_stride(tmp_path, client, sample_scene):
    """DeepLabV3+ has output stride 16; the old 2 ** depth guess (32) refused a 48 px tile it runs fine."""
    from geoseg.pipeline import check_model_fits, run_pipeline
    from tests.conftest import pipeline_config

    ckpt = make_checkpoint(tmp_path / "d.safetensors", architecture="deeplabv3plus", encoder="resnet18",
                           arch_kwargs={"decoder_channels": 16})
    cfg = pipeline_config(sample_scene.image, ckpt, tmp_path / "o", tile={"size": 48, "overlap": 16},
                          vectorize={"enabled": False})
    check_model_fits(cfg, read_model_spec(ckpt), "test")
    assert run_pipeline(cfg, client=client).landcover.exists()


def test_registry_covers_the_required_architectures():
    assert {"unet", "unetplusplus", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "segformer", "manet"} \
        <= set(ARCHITECTURES)


def test_unknown_architecture_lists_choices():
    with pytest.raises(CheckpointError, match=r"unknown architecture 'unet3'; available: unet, unetplusplus, fpn"):
        create_model("unet3", "resnet18", 4, 2)


def test_unknown_encoder_suggests_names():
    with pytest.raises(CheckpointError, match=r"unknown encoder 'resnet19'; e.g. resnet18"):
        create_model("unet", "resnet19", 4, 2)


def test_spec_is_readable_without_weights(fcn_checkpoint):  # noqa: ANN001
    spec = read_model_spec(fcn_checkpoint)
    assert spec.band_names == ["blue", "green", "red", "nir"]
    assert spec.classes.names[0] == "water" and spec.mean == (900.0,) * 4 and spec.output_stride == 1


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


def _with_header(tmp_path, source, header: dict):  # noqa: ANN001
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "h.safetensors"
    save_file(state, str(path), metadata={"geoseg": json.dumps(header)})
    return path


def test_a_first_wave_checkpoint_still_loads(tmp_path, unet_checkpoint):
    """Version 1 headers (no output stride, bands as plain records) load; the stride is read off the network."""
    header = json.loads(read_model_spec(unet_checkpoint).to_json())
    header["version"] = 1
    del header["output_stride"]
    spec = read_model_spec(_with_header(tmp_path, unet_checkpoint, header))
    assert spec.output_stride == 8 and spec.band_names == ["blue", "green", "red", "nir"]


@pytest.mark.parametrize("change,field", [
    ({"mean": 0}, "mean"),
    ({"bands": [{"name": "blue"}] * 4}, "bands.0.index"),
    ({"classes": 7}, "classes"),
    ({"arch_kwargs": {"encoder_depth": "five", "decoder_channels": [32, 16, 8]}}, "arch_kwargs"),
    ({"classes": [{"id": 300, "name": "x", "color": "#000000"}]}, "classes"),
    ({"classes": [{"id": 1, "name": "x", "color": [0, 0, 999]}]}, "classes"),
    ({"architecture": "unet3"}, "architecture"),
    ({"std": [0.0] * 4}, "std"),
])
def test_malformed_headers_are_one_line_errors_naming_the_field(tmp_path, unet_checkpoint, change, field):
    header = json.loads(read_model_spec(unet_checkpoint).to_json()) | change
    path = _with_header(tmp_path, unet_checkpoint, header)
    with pytest.raises(CheckpointError, match=rf"h.safetensors: not a valid geoseg checkpoint: {field}\b") as info:
        read_model_spec(path)
    assert "\n" not in str(info.value)

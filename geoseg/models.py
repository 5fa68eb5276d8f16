"""Model registry over segmentation-models-pytorch and self-describing, code-free checkpoints.

A checkpoint is one ``.safetensors`` file: the weights plus a JSON header (``__metadata__["geoseg"]``)
that says how to rebuild the network and how to feed it (bands, normalisation, classes, tile size).
Loading never unpickles: safetensors holds tensors only, and legacy torch files are read with
``torch.load(weights_only=True)``, which refuses pickles that carry code.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg._io import atomic_path
from geoseg.classes import ClassMap
from geoseg.errors import CheckpointError

if TYPE_CHECKING:
    import torch

FORMAT = "geoseg-checkpoint"
FORMAT_VERSION = 1

#: Registry name -> smp class name. Names are smp's own lower-case architecture keys.
ARCHITECTURES: dict[str, str] = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "deeplabv3plus": "DeepLabV3Plus",
    "segformer": "Segformer",
    "linknet": "Linknet",
    "manet": "MAnet",
    "pan": "PAN",
    "upernet": "UPerNet",
    "fcn": "geoseg.models:PixelFCN",
}


def _pixel_fcn_class():
    import torch

    class PixelFCN(torch.nn.Module):
        """A plain fully convolutional net: ``depth`` 3x3 conv-BN-ReLU layers at full resolution.

        Its receptive field is ``2 * depth + 1`` pixels and it has no downsampling (output stride 1), so
        tiled inference with a halo of ``depth`` reproduces a full-frame pass exactly. Fast on CPU; a
        baseline with spatial context, and the model the stitching tests use.
        """

        def __init__(self, in_channels: int, classes: int, width: int = 32, depth: int = 6):
            super().__init__()
            layers: list[torch.nn.Module] = []
            c = in_channels
            for _ in range(depth):
                layers += [torch.nn.Conv2d(c, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width),
                           torch.nn.ReLU(inplace=True)]
                c = width
            layers.append(torch.nn.Conv2d(c, classes, 1))
            self.net = torch.nn.Sequential(*layers)

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.net(x)

    return PixelFCN


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it: stored in the checkpoint header."""

    architecture: str
    encoder: str
    bands: list[dict]
    """Input bands in model order: ``{"index": 1-based band of the training rasters, "name": str}``."""
    mean: list[float]
    std: list[float]
    classes: list[dict]
    """Model output channels in order: ``{"id", "name", "color"}``."""
    tile_size: int
    arch_kwargs: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return len(self.bands)

    @property
    def class_map(self) -> ClassMap:
        return ClassMap.from_records(self.classes)

    @property
    def output_stride(self) -> int:
        """Input sides must be multiples of this (smp ``check_input_shape``)."""
        if self.architecture == "fcn":
            return 1
        depth = int(self.arch_kwargs.get("encoder_depth", 5))
        return 2**depth

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelSpec:
        try:
            raw = json.loads(text)
            if raw.pop("format", None) != FORMAT:
                raise ValueError("header is not a geoseg checkpoint")
            raw.pop("version", None)
            spec = cls(**raw)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: not a geoseg checkpoint ({exc})") from None
        if len(spec.mean) != spec.in_channels or len(spec.std) != spec.in_channels:
            raise CheckpointError(f"{source}: normalisation has {len(spec.mean)} values for {spec.in_channels} bands")
        return spec


def create_model(architecture: str, encoder: str, in_channels: int, classes: int, **kwargs: Any) -> torch.nn.Module:
    """Build an untrained smp model; an unknown name lists the choices."""
    import segmentation_models_pytorch as smp

    key = architecture.lower()
    if key not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {architecture!r}; available: {', '.join(ARCHITECTURES)}")
    if key == "fcn":
        try:
            return _pixel_fcn_class()(in_channels, classes, **kwargs)
        except TypeError as exc:
            raise CheckpointError(f"fcn: {exc} (takes width and depth)") from None
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders and not encoder.startswith("tu-"):
        close = [e for e in encoders if e.split("_")[0] == encoder.split("_")[0]][:5] or encoders[:8]
        raise CheckpointError(f"unknown encoder {encoder!r}; e.g. {', '.join(close)} (or any timm model as 'tu-NAME')")
    cls = getattr(smp, ARCHITECTURES[key])
    try:
        return cls(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{architecture}/{encoder}: {exc}") from None


def build_model(spec: ModelSpec, state_dict: dict | None = None) -> torch.nn.Module:
    """Model for ``spec`` in eval mode, with ``state_dict`` loaded when given."""
    model = create_model(spec.architecture, spec.encoder, spec.in_channels, len(spec.classes), **spec.arch_kwargs)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"weights do not match {spec.architecture}/{spec.encoder}: {first}") from None
    return model.eval()


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: ModelSpec) -> Path:
    """Write weights and spec to one ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; clone keeps every tensor its own.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path, overwrite=True) as tmp:
        save_file(state, str(tmp), metadata={"geoseg": spec.to_json()})
    return path


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: model checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors checkpoint file")


def read_model_spec(path: str | Path) -> ModelSpec:
    """Read only the header of a checkpoint (cheap: no weights are loaded)."""
    return load_checkpoint(path, weights=False)[0]


def load_checkpoint(path: str | Path, weights: bool = True) -> tuple[ModelSpec, dict | None]:
    """Return ``(spec, state_dict)`` from a checkpoint without executing any code from the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_exists(path)
    try:
        # The header alone needs no torch ("numpy" framework): the client reads specs without importing it.
        with safe_open(str(path), framework="pt" if weights else "numpy") as f:
            meta = f.metadata() or {}
            if "geoseg" not in meta:
                raise CheckpointError(f"{path}: safetensors file has no geoseg header; save it with geoseg train")
            spec = ModelSpec.from_json(meta["geoseg"], str(path))
            state = {k: f.get_tensor(k) for k in f.keys()} if weights else None
        return spec, state
    except SafetensorError as exc:
        safetensors_problem = str(exc)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        safetensors_problem = str(exc)
    return _load_torch_file(path, safetensors_problem)


def _load_torch_file(path: Path, safetensors_problem: str) -> tuple[ModelSpec, dict | None]:
    """Legacy ``torch.save({"geoseg": json, "state_dict": ...})`` files, loaded with weights_only=True."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: the file is a pickle that needs code to load (not executed); "
            "only .safetensors or weights-only torch checkpoints are accepted"
        ) from None
    except Exception:  # noqa: BLE001 - every other failure means "not a checkpoint"
        raise CheckpointError(
            f"{path}: not a geoseg checkpoint (not safetensors: {safetensors_problem.splitlines()[0][:80]})"
        ) from None
    if not isinstance(obj, dict) or "geoseg" not in obj or "state_dict" not in obj:
        raise CheckpointError(f"{path}: torch file without a geoseg header; save it with geoseg train")
    return ModelSpec.from_json(obj["geoseg"], str(path)), obj["state_dict"]

"""Model registry over segmentation-models-pytorch and self-describing, code-free checkpoints.

A checkpoint is one ``.safetensors`` file: the weights plus a JSON header (``__metadata__["geoseg"]``)
that says how to rebuild the network and how to feed it (bands, normalisation, classes, tile size, output
stride). The header is validated by a schema (:class:`ModelSpec`), so a malformed one is a one-line
"not a valid geoseg checkpoint" naming the field. Loading never unpickles: safetensors holds tensors only,
and legacy torch files are read with ``torch.load(weights_only=True)``, which refuses pickles that carry code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from geoseg._io import atomic_path
from geoseg.classes import ClassMap
from geoseg.errors import CheckpointError
from geoseg.registry import check_architecture

if TYPE_CHECKING:
    import torch

FORMAT = "geoseg-checkpoint"
#: 2: typed bands, the output stride read from the built network. 1 (first wave) still loads.
FORMAT_VERSION = 2


def _pixel_fcn_class() -> type:
    import torch

    class PixelFCN(torch.nn.Module):
        """A plain fully convolutional net: ``depth`` 3x3 conv-BN-ReLU layers at full resolution.

        Its receptive field is ``2 * depth + 1`` pixels and it has no downsampling (output stride 1), so
        tiled inference with a halo of ``depth`` reproduces a full-frame pass exactly. Fast on CPU; a
        baseline with spatial context, and the model the stitching tests use.
        """

        output_stride = 1

        def __init__(self, in_channels: int, classes: int, width: int = 32, depth: int = 6) -> None:
            super().__init__()
            layers: list[torch.nn.Module] = []
            c = in_channels
            for _ in range(depth):
                layers += [torch.nn.Conv2d(c, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width),
                           torch.nn.ReLU(inplace=True)]
                c = width
            layers.append(torch.nn.Conv2d(c, classes, 1))
            self.net = torch.nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    return PixelFCN


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Types of the architecture keywords geoseg's own configs use (checked when a header is read, in the client).
_KWARG_TYPES: dict[str, Any] = {
    "encoder_depth": lambda v: _int(v) and 1 <= v <= 5,
    "decoder_channels": lambda v: (_int(v) and v > 0) or (isinstance(v, list) and all(_int(x) and x > 0 for x in v)),
    "depth": lambda v: _int(v) and v >= 1,
    "width": lambda v: _int(v) and v >= 1,
    "upsampling": lambda v: _int(v) and v >= 1,
    "decoder_attention_type": lambda v: v is None or v == "scse",
    "encoder_output_stride": lambda v: v in (8, 16),
}
_KWARG_NAMES = {"encoder_depth": "an integer 1-5", "decoder_channels": "a positive integer or a list of them",
                "depth": "a positive integer", "width": "a positive integer", "upsampling": "a positive integer",
                "decoder_attention_type": "null or 'scse'", "encoder_output_stride": "8 or 16"}


class Band(BaseModel):
    """One input band of the model: its 1-based index in the training rasters and its name."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    index: int = Field(ge=1)
    name: str


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model and feed it: the checkpoint header, validated."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    architecture: str
    encoder: str
    bands: tuple[Band, ...] = Field(min_length=1)
    """Input bands in model order."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: ClassMap
    """Model output channels in order."""
    tile_size: int = Field(gt=0)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    output_stride: int = Field(1, ge=1)
    """Input sides must be multiples of this: smp's ``model.encoder.output_stride`` (1 for the fcn)."""
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("architecture")
    @classmethod
    def _registered(cls, v: str) -> str:
        return check_architecture(v)

    @field_validator("arch_kwargs")
    @classmethod
    def _kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            want = _KWARG_TYPES.get(key)
            if want is not None and not want(value):
                raise ValueError(f"{key}: {value!r} is not {_KWARG_NAMES[key]}")
        return v

    @field_validator("classes", mode="before")
    @classmethod
    def _class_map(cls, v: Any) -> ClassMap:
        if isinstance(v, ClassMap):
            return v
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"expected a list of {{id, name, color}}, got {type(v).__name__}")
        return ClassMap.from_records(v)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _numbers(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in v):
            raise ValueError(f"expected one number per band, got {v!r}"[:100])
        return v

    @field_serializer("classes")
    def _class_records(self, v: ClassMap) -> list[dict]:
        return v.to_records()

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if len(self.mean) != len(self.bands) or len(self.std) != len(self.bands):
            raise ValueError(f"normalisation has {len(self.mean)} means and {len(self.std)} deviations for "
                             f"{len(self.bands)} bands")
        if any(s <= 0 for s in self.std):
            raise ValueError("std: every band's deviation must be > 0")
        if len(self.classes) < 1:
            raise ValueError("classes: at least one class")
        return self

    @property
    def in_channels(self) -> int:
        """Number of input bands."""
        return len(self.bands)

    @property
    def band_names(self) -> list[str]:
        """Band names in model order."""
        return [b.name for b in self.bands]

    def to_json(self) -> str:
        """The header as stored in a checkpoint."""
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **self.model_dump(mode="json")},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelSpec:
        """Parse and validate a header; any problem is a one-line CheckpointError naming the field."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"{source}: not a valid geoseg checkpoint: header is not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not a valid geoseg checkpoint: header format is not {FORMAT!r}")
        version = raw.pop("version", 1)
        raw.pop("format")
        if version == 1 and "output_stride" not in raw:
            raw["output_stride"] = _legacy_output_stride(raw)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            where = f"{key}: " if key else ""
            raise CheckpointError(f"{source}: not a valid geoseg checkpoint: {where}{msg}") from None


def _legacy_output_stride(raw: dict) -> int:
    """Output stride of a version-1 header (written before it was stored): read off the built network."""
    try:
        model = create_model(str(raw["architecture"]), str(raw["encoder"]), len(raw["bands"]), len(raw["classes"]),
                             **dict(raw.get("arch_kwargs") or {}))
    except (CheckpointError, KeyError, TypeError):
        return 1  # the validation that follows names the broken field
    return output_stride(model)


def output_stride(model: torch.nn.Module) -> int:
    """What input sides must be multiples of: smp's ``model.encoder.output_stride`` (its own shape check)."""
    encoder = getattr(model, "encoder", None)
    stride: Any = getattr(encoder, "output_stride", None) or getattr(model, "output_stride", 1)
    return int(stride)


def create_model(architecture: str, encoder: str, in_channels: int, classes: int, **kwargs: Any) -> torch.nn.Module:
    """Build an untrained smp model; an unknown name lists the choices."""
    try:
        key = check_architecture(architecture)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if key == "fcn":
        try:
            return _pixel_fcn_class()(in_channels, classes, **kwargs)
        except TypeError as exc:
            raise CheckpointError(f"fcn: {exc} (takes width and depth)") from None
    import segmentation_models_pytorch as smp

    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders and not encoder.startswith("tu-"):
        close = [e for e in encoders if e.split("_")[0] == encoder.split("_")[0]][:5] or encoders[:8]
        raise CheckpointError(f"unknown encoder {encoder!r}; e.g. {', '.join(close)} (or any timm model as 'tu-NAME')")
    kwargs = {**_head_upsampling(key, kwargs), **kwargs}
    try:  # the registry's keys are smp's own architecture names
        model = smp.create_model(key, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                                 classes=classes, **kwargs)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{architecture}/{encoder}: {exc}") from None
    _check_output_size(model, f"{architecture}/{encoder}", in_channels)
    return model


def _head_upsampling(key: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``upsampling`` for a head that upsamples by a fixed factor: the encoder's output stride, unless given.

    smp's PSPNet and DeepLabV3 heads upsample by ``upsampling`` (default 8), right for their default encoders
    only: PSPNet's encoder runs ``encoder_depth`` stages (stride ``2 ** depth``), DeepLabV3's is dilated to
    ``encoder_output_stride``. Scaling the head to the encoder keeps the scores on the tile's grid pixel for
    pixel; a crop or resize after the fact would hide a misalignment.
    """
    if "upsampling" in kwargs:
        return {}
    if key == "pspnet":
        return {"upsampling": 2 ** int(kwargs.get("encoder_depth", 3))}
    if key == "deeplabv3":
        return {"upsampling": int(kwargs.get("encoder_output_stride", 8))}
    return {}


def _check_output_size(model: torch.nn.Module, name: str, in_channels: int) -> None:
    """Refuse a network whose scores are not on its input's grid (a tile's scores cover it pixel for pixel).

    smp FPN with ``encoder_depth`` < 5 and the default ``upsampling`` gives scores 2x or 4x the input.
    """
    import torch

    side = max(128, 2 * output_stride(model))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, in_channels, side, side))
    except RuntimeError:
        return  # a minimum size larger than the probe: the tile size check reports it with the tile at hand
    finally:
        model.train(was_training)
    if tuple(out.shape[-2:]) != (side, side):
        raise CheckpointError(f"{name}: gives {out.shape[-2]} x {out.shape[-1]} scores for a {side} x {side} tile; "
                              "the scores must cover the tile pixel for pixel (smp FPN with encoder_depth d < 5: "
                              "set upsampling: 2 ** (d - 3))")


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


def _looks_like_raster(path: Path) -> str | None:
    """The kind of a file that is clearly not a checkpoint (a raster, a YAML), from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "a TIFF raster"
    if head[:4] == b"\x89PNG":
        return "a PNG image"
    if head[:6] == b"SQLite":
        return "an SQLite file (GeoPackage?)"
    return None


def load_checkpoint(path: str | Path, weights: bool = True) -> tuple[ModelSpec, dict | None]:
    """Return ``(spec, state_dict)`` from a checkpoint without executing any code from the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_exists(path)
    kind = _looks_like_raster(path)
    if kind:
        raise CheckpointError(f"{path}: is {kind}, not a model checkpoint (.safetensors written by geoseg train)")
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

"""Typed pipeline and training configuration, validated once at the edge.

YAML is parsed safely, ``--set key=value`` overrides are merged, then pydantic validates the whole tree.
Every problem becomes one :class:`~geoseg.errors.ConfigError` line that names the file and the dotted key,
e.g. ``landcover.yaml: tile.overlap: must be even (got 33); use 32 or 34``. Relative paths are resolved
against the YAML file's folder, so a pipeline runs the same from any working directory.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from geoseg.classes import parse_color
from geoseg.errors import ConfigError


class _Config(BaseModel):
    """Base: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Any, info: ValidationInfo) -> Any:
    """Resolve a relative path against the folder of the YAML file it came from."""
    if value is None or value == "":
        return value
    base = (info.context or {}).get("base_dir")
    path = Path(str(value)).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return Path(os.path.normpath(Path(path).absolute()))


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if path.is_dir():
        raise ValueError(f"is a directory, expected a file: {path}")
    return path


# ----------------------------------------------------------------------------------------------- pipeline


class ReadConfig(_Config):
    """How the input raster is read."""

    bands: list[int] | None = Field(
        None, description="1-based band indexes fed to the model, in model order; default: the checkpoint's bands."
    )
    nodata: float | None = Field(
        None, description="Nodata value overriding the raster's own (for rasters whose nodata is missing or wrong)."
    )

    @field_validator("bands")
    @classmethod
    def _positive_bands(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one band, or be left out")
            if min(v) < 1:
                raise ValueError(f"band indexes are 1-based (got {min(v)})")
        return v


class TileConfig(_Config):
    """Tile grid: model windows of ``size`` pixels that share ``overlap`` pixels with their neighbours."""

    size: int = Field(512, gt=0, description="Side of the square window fed to the model, in pixels.")
    overlap: int = Field(
        64, ge=0, description="Pixels shared by neighbouring windows (even; at most half the size). Half of it is "
        "the halo each window sees beyond its core."
    )
    chunk_tiles: int = Field(
        3, ge=1, description="Tiles per Zarr chunk side. A chunk is one Dask task: larger chunks batch more tiles."
    )

    @model_validator(mode="after")
    def _check_overlap(self) -> TileConfig:
        if self.overlap % 2:
            raise ValueError(f"overlap must be even (got {self.overlap}); use {self.overlap - 1} or {self.overlap + 1}")
        if 2 * self.overlap > self.size:
            raise ValueError(f"overlap {self.overlap} is more than half the tile size {self.size}; use at most {self.size // 2}")
        return self


class InferConfig(_Config):
    """Model execution."""

    batch_size: int = Field(
        2, ge=1, description="Tiles per forward pass. On CPU 2 is as fast as 4 with one intra-op thread per task "
        "and needs 0.6 GB less per worker (Unet-resnet18, 512 px); on GPU use 16 or more.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA, fp32 on CPU. bf16 on CPU is faster on AMX machines."
    )
    channels_last: bool = Field(False, description="Run convolutions in channels-last memory format (faster on CPU).")
    tta: bool = Field(False, description="Test-time augmentation: average the logits of the tile and its flips.")
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per task; default: cores / (workers x threads per worker)."
    )


class StitchConfig(_Config):
    """How overlapping tile predictions are merged."""

    blend: Literal["cosine", "crop"] = Field(
        "cosine",
        description="'cosine': probabilities weighted by a raised cosine over the overlap (strictly positive); "
        "'crop': each pixel from the one tile whose core holds it.",
    )


class WriteConfig(_Config):
    """The land-cover GeoTIFF."""

    nodata: int = Field(255, ge=0, le=255, description="Output value for invalid pixels; never a class id.")
    confidence: Literal["none", "uint8", "float16"] = Field(
        "none", description="Also write confidence.tif, the top class probability (uint8 scales 0-1 to 0-250)."
    )
    keep_scores: bool = Field(False, description="Keep the Zarr store of class probabilities (scores.zarr).")
    keep_tiles: bool = Field(False, description="Keep the Zarr store of input tiles (tiles.zarr).")
    overviews: bool = Field(True, description="Build overviews (nearest/mode resampling) in the COG.")
    stac_item: bool = Field(True, description="Write item.json, a STAC Item describing the outputs.")
    compress: Literal["deflate", "lzw", "zstd", "none"] = Field("deflate", description="GeoTIFF compression.")


class TLSConfig(_Config):
    """TLS certificates for a scheduler that requires them (``tls://`` addresses)."""

    ca_file: Path = Field(description="CA certificate the scheduler's certificate is checked against.")
    cert: Path = Field(description="This client's certificate.")
    key: Path | None = Field(None, description="This client's private key, if not inside the certificate file.")

    _resolve_paths = field_validator("ca_file", "cert", "key", mode="before")(_resolve)

    @field_validator("ca_file", "cert", "key")
    @classmethod
    def _must_exist(cls, v: Path | None) -> Path | None:
        return None if v is None else _existing_file(v)


class JobqueueConfig(_Config):
    """Workers as batch jobs on SLURM or PBS (dask-jobqueue); one job runs ``processes`` workers."""

    queue: str | None = Field(None, description="Partition (SLURM -p) or queue (PBS -q).")
    account: str | None = Field(None, description="Account charged for the jobs (SLURM -A, PBS -A).")
    cores: int = Field(4, ge=1, description="Cores per job, shared by its worker processes.")
    memory: str = Field("16GiB", description="Memory per job, e.g. '16GiB'.")
    processes: int = Field(1, ge=1, description="Dask worker processes per job.")
    walltime: str = Field("02:00:00", description="Wall-clock limit per job, HH:MM:SS.")
    gpus: int = Field(0, ge=0, le=1, description="GPUs per job (0 or 1): a GPU job runs one worker with GPU=1.")
    minimum_jobs: int = Field(0, ge=0, description="Adaptive scaling: jobs kept even when idle.")
    maximum_jobs: int = Field(4, ge=1, description="Adaptive scaling: most jobs at once.")
    job_extra_directives: list[str] = Field(
        default_factory=list, description="More scheduler directives, e.g. ['--qos=night'] (SLURM) or ['-l select=1']."
    )
    job_script_prologue: list[str] = Field(
        default_factory=list, description="Shell lines run before the worker starts, e.g. ['source /opt/geoseg/.venv/bin/activate']."
    )
    log_directory: str | None = Field(None, description="Folder for the jobs' stdout/stderr.")
    interface: str | None = Field(None, description="Network interface workers listen on (e.g. ib0).")
    local_directory: str | None = Field(None, description="Worker scratch space on the compute nodes, e.g. $TMPDIR.")

    @model_validator(mode="after")
    def _jobs(self) -> JobqueueConfig:
        if self.minimum_jobs > self.maximum_jobs:
            raise ValueError(f"minimum_jobs {self.minimum_jobs} is more than maximum_jobs {self.maximum_jobs}")
        if self.gpus and self.processes != 1:
            raise ValueError("a GPU job runs one worker per GPU: set processes: 1")
        return self


class ClusterConfig(_Config):
    """Where Dask runs the tasks."""

    backend: Literal["local", "address", "slurm", "pbs"] = Field(
        "local", description="'local': a LocalCluster started for the run; 'address': an existing scheduler; "
        "'slurm'/'pbs': workers submitted as batch jobs through dask-jobqueue (pip install 'geoseg[slurm]').",
    )
    address: str | None = Field(None, description="Scheduler address for backend 'address', e.g. tcp://10.0.0.5:8786.")
    tls: TLSConfig | None = Field(None, description="Certificates for a tls:// scheduler (backend 'address').")
    jobqueue: JobqueueConfig = Field(default_factory=JobqueueConfig)
    n_workers: int = Field(1, ge=1, description="Local worker processes (one per GPU on a GPU machine).")
    threads_per_worker: int = Field(2, ge=1, description="Task threads per local worker (1 per GPU worker).")
    memory_limit: str = Field("auto", description="Per-worker memory limit for the LocalCluster, e.g. '4GiB'.")
    dashboard: bool = Field(False, description="Serve the Dask dashboard on 127.0.0.1 and print its link.")
    timeout_s: float = Field(30.0, gt=0, description="Seconds to wait for a scheduler before giving up.")

    @model_validator(mode="after")
    def _need_address(self) -> ClusterConfig:
        if self.backend == "address" and not self.address:
            raise ValueError("backend 'address' needs cluster.address (e.g. tcp://127.0.0.1:8786)")
        return self


class VectorizeConfig(_Config):
    """Polygons of the land-cover raster (GeoPackage, or FlatGeobuf by extension)."""

    enabled: bool = Field(True, description="Write the vector output.")
    output: str = Field("landcover.gpkg", description="File name in output_dir; .gpkg or .fgb.")
    layer: str = Field("landcover", description="Layer name in the GeoPackage.")
    connectivity: Literal[4, 8] = Field(4, description="Pixel connectivity of a polygon (as rasterio.features.shapes).")
    min_area_px: int = Field(0, ge=0, description="Minimum mapping unit in pixels (0: keep every patch).")
    min_area_m2: float = Field(0.0, ge=0, description="Minimum mapping unit in square metres (projected CRS); "
                               "the larger of the two units applies.")
    simplify: float = Field(0.0, ge=0, description="Topology-preserving simplification tolerance in CRS units.")
    block: int = Field(2048, ge=64, description="Block side for chunked polygonizing.")

    @field_validator("output")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if Path(v).name != v or v in ("", ".", ".."):
            raise ValueError(f"must be a file name inside output_dir, not a path (got {v!r})")
        if Path(v).suffix.lower() not in (".gpkg", ".fgb"):
            raise ValueError(f"extension must be .gpkg or .fgb (got {v!r})")
        return v


class EvaluateConfig(_Config):
    """Comparison with a reference map (skipped when no reference is given)."""

    reference: Path | None = Field(
        None, description="Reference land-cover map: a raster on any grid, or a vector file (.gpkg, .geojson, .shp)."
    )
    attribute: str = Field("class", description="Class attribute of a vector reference.")
    layer: str | None = Field(None, description="Layer of a multi-layer vector reference.")
    mapping: dict[int, int] = Field(
        default_factory=dict, description="Reference code -> model class id, e.g. {11: 1, 12: 1}; unlisted codes "
        "map to the class with the same id; codes that map to no class are reported, not counted.",
    )
    ignore: list[int] = Field(default_factory=list, description="Reference codes left out of the metrics.")
    nodata: float | None = Field(None, description="Overrides the reference raster's own nodata.")
    block: int = Field(2048, gt=0, description="Side of the windows the confusion matrix is streamed in.")

    _resolve_paths = field_validator("reference", mode="before")(_resolve)

    @field_validator("reference")
    @classmethod
    def _must_exist(cls, v: Path | None) -> Path | None:
        return None if v is None else _existing_file(v)

    def reference_spec(self):  # noqa: ANN201
        """The :class:`geoseg.evaluate.Reference` this section describes."""
        from geoseg.evaluate import Reference

        return Reference(self.reference, self.attribute, dict(self.mapping), tuple(self.ignore), self.nodata, self.layer)


class BatchConfig(_Config):
    """`geoseg batch`: many scenes on one cluster, one output folder each."""

    concurrent_scenes: int = Field(
        2, ge=1, description="Scenes in flight at once: their tasks share the workers, and one scene's writing "
        "overlaps another's inference.",
    )
    stac_asset: str = Field("image", description="Asset key of the scene raster in STAC items (--scenes items.json).")


class PipelineConfig(_Config):
    """A `geoseg run` pipeline: one scene in, a land-cover map out."""

    input: Path | None = Field(
        None, description="Input raster (GeoTIFF/COG or anything rasterio opens); required by `geoseg run`, set per "
        "scene by `geoseg batch`.",
    )
    model: Path = Field(description="Model checkpoint (.safetensors written by geoseg train).")
    output_dir: Path = Field(description="Folder for landcover.tif, run.json and the other outputs.")
    overwrite: bool = Field(False, description="Replace existing outputs (CLI: --overwrite).")
    read: ReadConfig = Field(default_factory=ReadConfig)
    tile: TileConfig = Field(default_factory=TileConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    stitch: StitchConfig = Field(default_factory=StitchConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)
    vectorize: VectorizeConfig = Field(default_factory=VectorizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)

    _resolve_paths = field_validator("input", "model", "output_dir", mode="before")(_resolve)

    @field_validator("input", "model")
    @classmethod
    def _must_exist(cls, v: Path | None) -> Path | None:
        return None if v is None else _existing_file(v)


# ----------------------------------------------------------------------------------------------- training


class SceneConfig(_Config):
    """An image with its label raster on the same grid."""

    image: Path
    labels: Path

    _resolve_paths = field_validator("image", "labels", mode="before")(_resolve)

    @field_validator("image", "labels")
    @classmethod
    def _must_exist(cls, v: Path) -> Path:
        return _existing_file(v)


class BandConfig(_Config):
    """One input band of the model."""

    index: int = Field(ge=1, description="1-based band index in the training rasters.")
    name: str = Field(description="Band name stored in the checkpoint (e.g. red, nir).")


class ClassConfig(_Config):
    """One output class and the label codes that map to it."""

    id: int = Field(ge=0, le=254, description="Class id written to the output raster.")
    name: str
    color: str | list[int] = Field(description="#rrggbb or [r, g, b].")
    codes: list[int] = Field(default_factory=list, description="Label codes mapped to this class; default [id].")

    @field_validator("color")
    @classmethod
    def _valid_color(cls, v: str | list[int]) -> str | list[int]:
        parse_color(v)
        return v

    @property
    def label_codes(self) -> list[int]:
        return self.codes or [self.id]


class WindowConfig(_Config):
    """A pixel window: rows ``row_off``.. and columns ``col_off``.. (rasterio vocabulary)."""

    row_off: int = Field(0, ge=0)
    col_off: int = Field(0, ge=0)
    height: int | None = Field(None, gt=0, description="Rows; default: to the bottom edge of the scene.")
    width: int | None = Field(None, gt=0, description="Columns; default: to the right edge of the scene.")


class ValidationConfig(_Config):
    """Held-out data: separate scenes and/or a window of the training scenes excluded from training."""

    scenes: list[SceneConfig] = Field(default_factory=list)
    window: WindowConfig | None = Field(None, description="Area of each training scene used only for validation.")


class ModelConfig(_Config):
    """Network to train: an smp architecture and encoder."""

    architecture: str = Field("unet", description="smp architecture: unet, unetplusplus, fpn, deeplabv3plus, segformer, ...")
    encoder: str = Field("resnet18", description="smp encoder name (no pretrained weights are downloaded).")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra smp keyword arguments, e.g. encoder_depth.")


LossName = Literal["ce", "dice", "focal", "ce+dice", "focal+dice"]


class LossConfig(_Config):
    """Training loss; label codes in ``ignore_codes`` (and nodata) never contribute."""

    name: LossName = Field("ce", description="ce (cross-entropy), dice, focal, or a sum: ce+dice, focal+dice.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="'balanced': inverse class frequency of the training pixels (scikit-learn's rule), or "
        "one weight per class in class order.",
    )
    focal_gamma: float = Field(2.0, ge=0, description="Focusing parameter of the focal loss.")
    second_weight: float = Field(1.0, ge=0, description="Weight of the second term of a sum (the dice in ce+dice).")

    @field_validator("class_weights")
    @classmethod
    def _non_negative(cls, v: str | list[float]) -> str | list[float]:
        if isinstance(v, list) and (not v or min(v) < 0):
            raise ValueError("weights must be a non-empty list of numbers >= 0")
        return v


class SamplingConfig(_Config):
    """How training windows are drawn from the training area."""

    class_balanced: bool = Field(
        False, description="Centre each window near a pixel of a class drawn uniformly from the classes present, "
        "so rare classes are seen as often as common ones.",
    )
    min_labelled: float = Field(0.5, gt=0, le=1, description="Least fraction of labelled, valid pixels in a window.")


class AugmentConfig(_Config):
    """Augmentations for overhead imagery (applied to training windows only)."""

    flips: bool = Field(True, description="Random horizontal and vertical flips.")
    rotate90: bool = Field(True, description="Random rotations by multiples of 90 degrees.")
    brightness: float = Field(0.0, ge=0, description="Per-band additive jitter in band standard deviations (e.g. 0.1).")
    contrast: float = Field(0.0, ge=0, lt=1, description="Per-band multiplicative jitter: x (1 +- contrast).")
    scale: float = Field(0.0, ge=0, lt=1, description="Scale jitter: windows resampled by a factor in "
                         "[1 - scale, 1 + scale] (bilinear image, nearest labels); 0: off.")


class TrainConfig(_Config):
    """A `geoseg train` run."""

    output: Path = Field(description="Checkpoint to write (.safetensors).")
    overwrite: bool = False
    model: ModelConfig = Field(default_factory=ModelConfig)
    bands: list[BandConfig] = Field(min_length=1)
    classes: list[ClassConfig] = Field(min_length=2)
    ignore_codes: list[int] = Field(default_factory=list, description="Label codes excluded from the loss and metrics.")
    train: list[SceneConfig] = Field(min_length=1)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tile_size: int = Field(128, gt=0, description="Training window side in pixels.")
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["onecycle", "cosine"] = Field(
        "onecycle", description="Learning-rate schedule over all steps: one-cycle (warm-up then anneal) or cosine decay."
    )
    grad_clip: float = Field(5.0, ge=0, description="Clip the gradient norm to this value (0: no clipping).")
    patience: int | None = Field(
        None, ge=1, description="Early stopping: stop after this many epochs without a better validation mIoU."
    )
    loss: LossConfig = Field(default_factory=LossConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' trains on CUDA when present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA (fp16 with loss scaling where bf16 is missing), fp32 on CPU."
    )
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores.")

    _resolve_paths = field_validator("output", mode="before")(_resolve)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique (got {ids})")
        codes = [code for c in self.classes for code in c.label_codes]
        if len(set(codes)) != len(codes):
            raise ValueError("a label code is mapped to two classes")
        if set(codes) & set(self.ignore_codes):
            raise ValueError("a label code is both mapped to a class and ignored")
        if not self.validation.scenes and self.validation.window is None:
            raise ValueError("validation needs scenes or a window (a held-out area, never random pixels)")
        weights = self.loss.class_weights
        if isinstance(weights, list) and len(weights) != len(self.classes):
            raise ValueError(f"loss.class_weights: {len(weights)} weights for {len(self.classes)} classes")
        return self


# ----------------------------------------------------------------------------------------------- loading

C = TypeVar("C", bound=BaseModel)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars or lists (``tile.size=256``, ``read.bands=[1,2]``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set tile.size=256")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def read_yaml(path: str | Path) -> dict:
    """Safely parse a YAML mapping; syntax errors name the line and column."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path.name}{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the sub-model that ``loc`` points into (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            break
        annotation = fields[part].annotation
        args = getattr(annotation, "__args__", ()) or ()
        candidates = [annotation, *args]
        for arg in list(candidates):
            candidates += list(getattr(arg, "__args__", ()) or ())
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _format_error(model: type[BaseModel], err: dict) -> str:
    loc = [p for p in err["loc"]]
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return f"{key}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{key}: {msg}"


def validate(model: type[C], data: dict, source: str, base_dir: Path | None) -> C:
    """Validate ``data`` into ``model``; errors become one ConfigError line naming ``source`` and the keys."""
    try:
        return model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        parts = [_format_error(model, e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(parts)) from None


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and the presets it names in ``extends`` (merged first, this file on top)."""
    path = Path(path).absolute()
    if path in _seen:
        raise ConfigError(f"{path.name}: extends: circular include of {path}")
    data = read_yaml(path)
    bases = data.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path.name}: extends: expected a path or a list of paths to preset YAML files")
    merged: dict = {}
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.exists():
            raise ConfigError(f"{path.name}: extends: preset not found: {base_path}")
        layer = read_config_tree(base_path, (*_seen, path))
        # Relative paths in a preset are relative to the preset, not to the including file.
        merged = _merge(merged, _absolute_paths(layer, base_path.parent))
    return _merge(merged, data)


_PATH_KEYS = {"input", "model", "output_dir", "output", "image", "labels", "reference"}


def _absolute_paths(node: Any, base: Path) -> Any:
    if isinstance(node, dict):
        return {k: (str(base / v) if k in _PATH_KEYS and isinstance(v, str) and not Path(v).is_absolute()
                    else _absolute_paths(v, base)) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute_paths(v, base) for v in node]
    return node


def load_config(path: str | Path, overrides: Iterable[str] = (), model: type[C] = PipelineConfig) -> C:  # type: ignore[assignment]
    """Load and validate a YAML config (with its ``extends`` presets) and ``--set`` style overrides."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    data = read_config_tree(path)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return validate(model, data, path.name, path.parent.absolute())


def dump_config(cfg: BaseModel) -> dict:
    """Plain-JSON form of a resolved config (absolute paths as strings)."""
    return cfg.model_dump(mode="json")


# ----------------------------------------------------------------------------------------------- docs


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
        "Generated from `geoseg/config.py` (`python -m geoseg.config > docs/config.md`); a test keeps it current.",
        "Relative paths are resolved against the folder of the YAML file. Any key can be overridden on the",
        "command line with `--set key.sub=value` (repeatable). Unknown keys are errors.",
        "",
        "A file may start with `extends: [preset.yaml, ...]`: the presets (e.g. `configs/cpu-fast.yaml`,",
        "`configs/legend-sample.yaml`) are merged first, then the file's own keys on top.",
        "",
    ]
    for title, model in (("Pipeline (`geoseg run`, `geoseg batch`)", PipelineConfig), ("Training (`geoseg train`)", TrainConfig)):
        lines += [f"## {title}", "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, typ, default, desc in _walk(model, ""):
            lines.append(f"| `{key}` | {typ} | {default} | {desc} |".replace("| section |", "| *section* |"))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown())

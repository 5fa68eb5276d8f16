"""The `geoseg run` / `geoseg batch` configuration: one model per stage, plus the pipeline that holds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from geoseg.config._base import _Config, existing_file

#: Largest tile side: a 8192^2 tile of 4 float32 bands is 1 GiB before the network's activations.
MAX_TILE = 8192
#: Largest chunk side (tile.chunk_tiles x stride): a chunk's sums are (classes + 1) x side^2 float32.
MAX_CHUNK = 16384


class ReadConfig(_Config):
    """How the input raster is read."""

    bands: list[int] | None = Field(
        None, description="1-based band indexes fed to the model, in model order; default: the checkpoint's bands."
    )
    nodata: float | None = Field(
        None, description="Nodata value overriding the raster's own (for rasters whose nodata is missing or wrong)."
    )
    scale_offset: Literal["refuse", "apply", "ignore"] = Field(
        "refuse", description="Inputs whose bands carry scale/offset metadata: 'apply' feeds the model "
        "value x scale + offset, 'ignore' the stored values (what geoseg train reads); 'refuse' says so and stops.",
    )
    strict: bool = Field(
        False, description="Refuse an input unlike the model's training data (another dtype, values 10x off, band "
        "means many training deviations away, bands picked by index); by default a warning, kept in run.json.",
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

    size: int = Field(512, gt=0, le=MAX_TILE, description="Side of the square window fed to the model, in pixels.")
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
            raise ValueError(f"overlap {self.overlap} is more than half the tile size {self.size}; "
                             f"use at most {self.size // 2}")
        side = self.chunk_tiles * (self.size - self.overlap)
        if side > MAX_CHUNK:
            most = MAX_CHUNK // (self.size - self.overlap)
            raise ValueError(f"chunk_tiles {self.chunk_tiles} makes chunks of {side:,} px a side, more than a task "
                             f"may hold ({MAX_CHUNK:,}); use at most {most} with tiles of {self.size}/{self.overlap}")
        return self


class InferConfig(_Config):
    """Model execution."""

    batch_size: int = Field(
        4, ge=1, description="Tiles per forward pass (4 on CPU, as a competent hand loop uses; 16 or more on GPU).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on CUDA; on the CPU bf16 where it computes bf16 natively (AMX, "
        "AVX-512 BF16: ~4x faster) and the model passed geoseg train's bf16 check (>= 99.9% of validation pixels "
        "classified as in fp32), else fp32. 'fp32' is exact.",
    )
    channels_last: bool | None = Field(
        None, description="Channels-last memory format for the convolutions (unset: on; same classes, faster).")
    tta: Literal["none", "flips", "d4"] = Field(
        "none", description="Test-time augmentation: average the class probabilities of each tile over its flips "
        "('flips': 4 passes) or its eight rotations and flips ('d4': 8 passes), inside the same blending.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per task; default: cores / (workers x threads per worker)."
    )

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_from_bool(cls, v: Any) -> Any:
        # Configs written before the modes existed said `tta: true` for the four flips.
        return {True: "flips", False: "none"}.get(v, v) if isinstance(v, bool) else v


class RefineConfig(_Config):
    """Boundary refinement of the stitched class probabilities (docs/tiling.md)."""

    method: Literal["none", "guided"] = Field(
        "none", description="'guided': an edge-aware guided filter of each class probability map under the image "
        "(the mean of the normalised bands), so class edges follow image edges; per chunk with a halo of "
        "2 x radius pixels, seamless.",
    )
    radius: int = Field(2, ge=1, le=32, description="Window radius of the guided filter in pixels.")
    eps: float = Field(0.01, gt=0, description="Regularisation: larger smooths more, smaller follows the image "
                       "more closely (in normalised band units squared).")


class StitchConfig(_Config):
    """How overlapping tile predictions are merged."""

    blend: Literal["cosine", "crop"] = Field(
        "crop",
        description="'crop': each pixel from the one tile whose core holds it (measured closest to one "
        "full-frame pass: 99.998% at 512/64 with the demo model, cosine 99.995%, docs/tiling.md); 'cosine': "
        "probabilities weighted by a raised cosine over the overlap (smooth confidence across tile edges).",
    )
    refine: RefineConfig = Field(default_factory=RefineConfig)


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
    datetime: str | None = Field(None, description="Acquisition time of the scene (ISO 8601) for the STAC Item, "
                                 "when the input carries none (TIFFTAG_DATETIME) and no source item gives one.")
    compress: Literal["deflate", "lzw", "zstd", "none"] = Field("deflate", description="GeoTIFF compression.")
    on_workers: bool | Literal["auto"] = Field(
        "auto", description="Write the outputs on the Dask workers: the stitch tasks store their blocks in the "
        "scratch folder and one worker task per scene writes the COGs, vectorizes and evaluates, so the client "
        "only coordinates (the outputs are byte-identical either way); false streams every block to this "
        "process and writes there; auto: on the workers unless cluster.backend is local (one machine, where "
        "streaming saves the store's round trip).",
    )
    creation_options: dict[str, str] = Field(
        default_factory=dict, description="More GDAL COG creation options for the rasters (geoseg run --co KEY=VALUE), "
        "e.g. {BLOCKSIZE: '256', LEVEL: '9'}; they override geoseg's own.",
    )

    @field_validator("datetime")
    @classmethod
    def _when(cls, v: str | None) -> str | None:
        return _iso_time(v)

    @field_validator("creation_options", mode="before")
    @classmethod
    def _upper_keys(cls, v: Any) -> Any:
        return {str(k).upper(): str(val) for k, val in v.items()} if isinstance(v, dict) else v


def _iso_time(v: str | None) -> str | None:
    if v is None:
        return v
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{v!r} is not an ISO 8601 time, e.g. 2026-11-20T10:31:00Z") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).isoformat()


class TLSConfig(_Config):
    """TLS certificates for a scheduler that requires them (``tls://`` addresses)."""

    ca_file: Path = Field(description="CA certificate the scheduler's certificate is checked against.")
    cert: Path = Field(description="This client's certificate.")
    key: Path | None = Field(None, description="This client's private key, if not inside the certificate file.")

    @field_validator("ca_file", "cert", "key")
    @classmethod
    def _must_exist(cls, v: Path | None) -> Path | None:
        return None if v is None else existing_file(v)


class JobqueueConfig(_Config):
    """Workers as batch jobs on SLURM or PBS (dask-jobqueue); one job runs ``processes`` workers."""

    queue: str | None = Field(None, description="Partition (SLURM -p) or queue (PBS -q).")
    account: str | None = Field(None, description="Account charged for the jobs (SLURM -A, PBS -A).")
    cores: int = Field(4, ge=1, description="Cores per job, shared by its worker processes.")
    memory: str = Field("16GiB", description="Memory per job, e.g. '16GiB'.")
    processes: int = Field(1, ge=1, description="Dask worker processes per job.")
    walltime: str = Field("02:00:00", description="Wall-clock limit per job, HH:MM:SS.")
    gpus: int = Field(0, ge=0, le=1, description="GPUs per job (0 or 1): a GPU job runs one worker with GPU=1.")
    minimum_jobs: int = Field(0, ge=0, description="Adaptive scaling: jobs kept even when idle (a run holds at "
                              "least one while it lasts; every job ends with the run).")
    maximum_jobs: int = Field(4, ge=1, description="Adaptive scaling: most jobs at once.")
    max_pending_jobs: int = Field(
        1, ge=1, description="Most worker jobs waiting in the queue at once: more are submitted only as the "
        "waiting ones start (jobs that cannot start yet would only sit pending).",
    )
    job_name: str | None = Field(
        None, description="Name of the worker jobs (squeue, qstat) [default: geoseg-<output folder name>, e.g. "
        "geoseg-2026-11-30 for a night's batch].",
    )
    job_extra_directives: list[str] = Field(
        default_factory=list, description="More scheduler directives, e.g. ['--qos=night'] (SLURM) or ['-l select=1']."
    )
    job_script_prologue: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the worker starts, e.g. ['source /opt/geoseg/.venv/bin/activate'].",
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
    infer_per_worker: int = Field(
        2, ge=1, description="Inference tasks a local worker runs at once; they share its cores (intra-op "
        "threads = cores / this), and task threads beyond them read tiles and stitch meanwhile. Measured on 2 "
        "cores (docs/tiling.md): two single-threaded forwards beat one with both cores by 1.08-1.15x (a forward "
        "with two threads stalls whenever reading or stitching takes a core).",
    )
    memory_limit: str = Field("auto", description="Per-worker memory limit for the LocalCluster, e.g. '4GiB'.")
    dashboard: bool = Field(False, description="Serve the Dask dashboard on 127.0.0.1 and print its link.")
    timeout_s: float = Field(30.0, gt=0, description="Seconds to wait for a scheduler before giving up.")
    worker_timeout_s: float = Field(
        600.0, gt=0, description="Seconds to wait for a worker (a SLURM/PBS job pending in the queue, a scheduler "
        "with none) before giving up, at the start and whenever every worker is gone; a line every 15 s meanwhile.",
    )

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, v: str | None) -> str | None:
        return None if v is None else parse_scheduler_address(v)

    @model_validator(mode="after")
    def _need_address(self) -> ClusterConfig:
        if self.backend == "address" and not self.address:
            raise ValueError("backend 'address' needs cluster.address (e.g. tcp://127.0.0.1:8786)")
        return self


_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss")


def parse_scheduler_address(text: str) -> str:
    """A Dask scheduler address as ``scheme://host:port`` (``host:port`` means tcp); anything else is refused."""
    import re

    expected = "expected tcp://HOST:PORT or tls://HOST:PORT, e.g. tcp://10.0.0.5:8786"
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "tcp", raw
    if scheme == "inproc" and rest:
        return raw  # a scheduler in this very process (Python API and tests)
    if scheme not in _SCHEMES:
        raise ValueError(f"{text!r}: scheme {scheme!r} is not one Dask speaks ({', '.join(_SCHEMES)}); {expected}")
    match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d+)", rest)
    if not match:
        raise ValueError(f"{text!r} is not a scheduler address; {expected}")
    port = int(match.group(2))
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is outside 1-65535; {expected}")
    return f"{scheme}://{match.group(1)}:{port}"


class VectorizeConfig(_Config):
    """Polygons of the land-cover raster (GeoPackage, FlatGeobuf or GeoParquet by extension)."""

    enabled: bool = Field(True, description="Write the vector output.")
    output: str = Field("landcover.gpkg", description="File name in output_dir: .gpkg (its style inside), .fgb or "
                        ".parquet (GeoParquet 1.1, pip install 'geoseg[parquet]'; both with a .qml style beside).")
    layer: str = Field("landcover", description="Layer name in the GeoPackage.")
    connectivity: Literal[4, 8] = Field(4, description="Pixel connectivity of a polygon (as rasterio.features.shapes).")
    min_area_px: int = Field(0, ge=0, description="Minimum mapping unit in pixels (0: keep every patch).")
    min_area_m2: float = Field(0.0, ge=0, description="Minimum mapping unit in square metres (projected CRS); "
                               "the larger of the two units applies.")
    simplify: float = Field(0.0, ge=0, description="Topology-preserving simplification tolerance in CRS units.")
    block: int = Field(2048, ge=4, description="Block side for chunked polygonizing.")

    @field_validator("output")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if Path(v).name != v or v in ("", ".", ".."):
            raise ValueError(f"must be a file name inside output_dir, not a path (got {v!r})")
        suffix = Path(v).suffix.lower()
        if suffix not in (".gpkg", ".fgb", ".parquet"):
            raise ValueError(f"extension must be .gpkg, .fgb or .parquet (got {v!r})")
        if suffix != ".gpkg" and Path(v).stem == "landcover":
            raise ValueError(f"{v} would share landcover.qml with the raster's style; name it e.g. "
                             f"landcover-polygons{suffix}")
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

    @field_validator("reference")
    @classmethod
    def _must_exist(cls, v: Path | None) -> Path | None:
        return None if v is None else existing_file(v)


class BatchConfig(_Config):
    """`geoseg batch`: many scenes on one cluster, one output folder each."""

    concurrent_scenes: int | Literal["auto"] = Field(
        "auto", description="Scenes in flight at once: their tasks share the workers, and one scene's writing "
        "overlaps another's inference; auto: one more than the cluster's inference slots (at least 2, at most "
        "256), so every slot has a scene to work on; each scene submits 3 tasks per chunk.",
    )

    @field_validator("concurrent_scenes")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or auto)")
        return v
    stac_asset: str = Field("image", description="Asset key of the scene raster in STAC items (--scenes items.json).")


class SegmentConfig(_Config):
    """The scene graph (tile, infer, stitch): what :func:`geoseg.segment.segment_scene` needs."""

    model: Path = Field(description="Model checkpoint.")
    tile: TileConfig = Field(default_factory=TileConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    stitch: StitchConfig = Field(default_factory=StitchConfig)
    nodata: int = Field(255, ge=0, le=255, description="Class-id value of pixels without a prediction.")


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

    @field_validator("input", "model")
    @classmethod
    def _must_exist(cls, v: Path | None) -> Path | None:
        return None if v is None else existing_file(v)


    @property
    def segment(self) -> SegmentConfig:
        """The scene graph's own config, taken from this pipeline's sections."""
        return SegmentConfig(model=self.model, tile=self.tile, infer=self.infer, stitch=self.stitch,
                             nodata=self.write.nodata)

"""The `geoseg run` pipeline: guards -> read -> segment -> write -> vectorize -> evaluate -> STAC -> manifest.

Stages are plain functions in their own modules; this runner only wires them: it checks the outputs it may
write, streams the stitched blocks of :func:`geoseg.segment.segment_scene` into the writers, runs the
later stages on the finished raster and records what happened in ``run.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg._io import check_overwrite, remove, write_text_atomic
from geoseg._version import __version__
from geoseg.config import PipelineConfig, dump_config, load_config
from geoseg.errors import ConfigError, GeosegError, InputError
from geoseg.fingerprint import model_digest, output_fingerprint
from geoseg.models import ModelSpec, read_model_spec
from geoseg.progress import progress_bar

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.read import Raster

log = logging.getLogger("geoseg")

LANDCOVER = "landcover.tif"
CONFIDENCE = "confidence.tif"
MANIFEST = "run.json"
STAC_ITEM = "item.json"
RESOLVED_CONFIG = "pipeline-config.json"
WORK_DIR = ".geoseg-work"


def outputs(cfg: PipelineConfig) -> list[str]:
    """Names (inside ``cfg.output_dir``) of every file or folder a run of ``cfg`` writes, manifest last."""
    from geoseg.report import FILES as REPORT_FILES

    names = [LANDCOVER, Path(LANDCOVER).with_suffix(".qml").name]
    if cfg.write.confidence != "none":
        names.append(CONFIDENCE)
    if cfg.write.keep_scores:
        names.append("scores.zarr")
    if cfg.write.keep_tiles:
        names.append("tiles.zarr")
    if cfg.vectorize.enabled:
        names.append(cfg.vectorize.output)
    if cfg.evaluate.reference is not None:
        names += list(REPORT_FILES.values())
    if cfg.write.stac_item:
        names.append(STAC_ITEM)
    return [*names, RESOLVED_CONFIG, MANIFEST]


def check_model_fits(cfg: PipelineConfig, spec: ModelSpec, source: str) -> None:
    """Refuse impossible combinations of pipeline and model before any work starts."""
    stride = spec.output_stride
    if cfg.tile.size % stride:
        lo, hi = cfg.tile.size // stride * stride, (cfg.tile.size // stride + 1) * stride
        use = f"{hi} or {lo}" if lo else f"{hi}"
        raise ConfigError(
            f"{source}: tile.size: {cfg.tile.size} is not divisible by the model's output stride {stride}; use {use}"
        )
    if cfg.write.nodata in spec.classes.ids:
        free = next(v for v in range(255, -1, -1) if v not in spec.classes.ids)
        raise ConfigError(f"{source}: write.nodata: {cfg.write.nodata} is a class id of the model; use {free}")
    if cfg.read.bands is not None and len(cfg.read.bands) != spec.in_channels:
        raise ConfigError(
            f"{source}: read.bands: selects {len(cfg.read.bands)} bands but the model expects "
            f"{spec.in_channels} ({', '.join(spec.band_names)})"
        )


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML and check it against its model checkpoint."""
    cfg: PipelineConfig = load_config(path, overrides)
    check_model_fits(cfg, read_model_spec(cfg.model), Path(path).name)
    return cfg


@dataclass
class RunResult:
    """What a run produced: output paths, timings and the manifest's path."""

    output_dir: Path
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None

    @property
    def landcover(self) -> Path:
        """The land-cover GeoTIFF."""
        return Path(self.outputs["landcover"])

    @property
    def manifest(self) -> Path:
        """``run.json``."""
        return self.output_dir / MANIFEST


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


def run_pipeline(cfg: PipelineConfig, *, client: Client | None = None, progress: bool | None = None,
                 item_id: str | None = None, source: dict | None = None) -> RunResult:
    """Run one scene through every stage; write outputs and ``run.json`` into ``cfg.output_dir``.

    ``client``: an existing ``distributed.Client`` to use instead of the one ``cfg.cluster`` describes.
    ``item_id`` and ``source`` name the scene's STAC Item and the item it came from (``geoseg batch``).
    """
    if cfg.input is None:
        raise ConfigError("input: required key is missing (or run many scenes with geoseg batch --scenes)")
    out_dir = cfg.output_dir
    result = RunResult(out_dir)
    started = datetime.now(timezone.utc)
    spec = read_model_spec(cfg.model)
    check_model_fits(cfg, spec, "config")
    # The run.json of a failed or interrupted run records that attempt; it is not an output to protect.
    manifest_is_output = previous_status(out_dir) == "done"
    for name in outputs(cfg):
        if name not in (RESOLVED_CONFIG, MANIFEST) or (name == MANIFEST and manifest_is_output):
            check_overwrite(out_dir / name, cfg.overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output_dir: cannot create {out_dir} ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise InputError(f"output_dir: {out_dir} is not writable")
    if progress is None:
        progress = sys.stderr.isatty()
    manifest: dict[str, Any] = {
        "geoseg_version": __version__,
        "status": "running",
        "started": started.isoformat(),
        "config": dump_config(cfg),
        "fingerprint": output_fingerprint(cfg),
        "inputs": {
            "raster": _describe_file(cfg.input),
            "model": {**_describe_file(cfg.model), "sha256": model_digest(cfg.model)},
        },
    }
    try:
        raster = _run_stages(cfg, spec, result, progress, client)
        if result.metrics is not None:
            manifest["metrics"] = result.metrics
        if cfg.write.stac_item:
            from geoseg.stac import stac_item

            item = stac_item(item_id or cfg.input.stem, raster, result.outputs, spec.classes, cfg.write.nodata,
                             metrics=result.metrics, source=source)
            write_text_atomic(out_dir / STAC_ITEM, json.dumps(item, indent=2) + "\n")
            result.outputs["stac_item"] = str(out_dir / STAC_ITEM)
        manifest["status"] = "done"
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, CancelledError))
        manifest["status"] = "interrupted" if stopped else "failed"
        manifest["error"] = str(exc) if isinstance(exc, GeosegError) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        manifest.update(
            finished=datetime.now(timezone.utc).isoformat(),
            outputs=result.outputs,
            timings_s=result.timings,
            stats=result.stats,
        )
        try:
            write_text_atomic(out_dir / RESOLVED_CONFIG, json.dumps(dump_config(cfg), indent=2) + "\n")
            write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        except OSError:
            log.error("could not write %s", out_dir / MANIFEST)
    result.outputs["manifest"] = str(result.manifest)
    return result


def _describe_file(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime": st.st_mtime}


def previous_status(out_dir: Path) -> str | None:
    """Status recorded in ``out_dir/run.json`` by an earlier run (done, failed, interrupted), or None."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _run_stages(cfg: PipelineConfig, spec: ModelSpec, result: RunResult, progress: bool,
                client: Client | None) -> Raster:
    """Every stage of one scene; returns the input's :class:`~geoseg.read.Raster`."""
    import rasterio

    from geoseg.cluster import GDAL_CACHE_MB, open_client
    from geoseg.device import resolve_device
    from geoseg.read import read_raster
    from geoseg.segment import Block, SegmentStats, segment_scene
    from geoseg.write import confidence_writer, encode_confidence, landcover_writer, write_qgis_style

    assert cfg.input is not None
    timings, out_dir = result.timings, cfg.output_dir
    with _timed(timings, "read"):
        raster = read_raster(cfg.input, cfg.read, spec)
    device, _ = resolve_device(cfg.infer.device, cfg.infer.precision, local=False)
    result.stats.update(width=raster.width, height=raster.height, bands=list(raster.bands),
                        crs=raster.grid.crs.to_string(), tile=cfg.tile.size, overlap=cfg.tile.overlap)

    with ExitStack() as stack:
        # The writers stream a scene-sized raster through GDAL's block cache in this process.
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
        if client is None:
            client = stack.enter_context(open_client(cfg.cluster, use_gpu=device == "cuda"))
        if cfg.cluster.dashboard and client.dashboard_link:
            log.info("Dask dashboard: %s", client.dashboard_link)

        lc_path = out_dir / LANDCOVER
        classes = spec.classes
        writers = [landcover_writer(lc_path, raster.grid, classes, cfg.write.nodata, compress=cfg.write.compress,
                                    overviews=cfg.write.overviews, overwrite=cfg.overwrite)]
        stack.callback(writers[0].abort)
        if cfg.write.confidence != "none":
            writers.append(confidence_writer(out_dir / CONFIDENCE, raster.grid, cfg.write.confidence,
                                             compress=cfg.write.compress, overviews=cfg.write.overviews,
                                             overwrite=cfg.overwrite))
            stack.callback(writers[1].abort)
        scores = out_dir / "scores.zarr" if cfg.write.keep_scores else None
        if scores is not None:
            check_overwrite(scores, cfg.overwrite)
            remove(scores)

        stats = SegmentStats()
        bar = None

        def advance(block: Block) -> None:
            if bar:
                bar.advance(bar.task_ids[0])

        kept = out_dir / "tiles.zarr" if cfg.write.keep_tiles else None
        blocks = segment_scene(raster, cfg.segment, client, out_dir / WORK_DIR, stats=stats, scores=scores,
                               keep_tiles=kept, progress=advance)
        with _timed(timings, "tile_infer_stitch"):
            try:
                for block in blocks:
                    if bar is None:
                        bar = progress_bar(stats.chunks[0] * stats.chunks[1], "segmenting", progress)
                        advance(block)
                    writers[0].write(block.window, block.labels)
                    if len(writers) > 1:
                        known = block.labels != cfg.write.nodata
                        writers[1].write(block.window, encode_confidence(block.confidence, known, cfg.write.confidence))
            finally:
                if bar:
                    bar.stop()
        result.stats.update(
            device=stats.device, precision=stats.precision, chunks=list(stats.chunks),
            chunks_resumed=stats.chunks_resumed, chunks_inferred=stats.chunks_inferred,
            task_seconds=stats.task_seconds, valid_pixels=stats.valid_pixels, tiles_inferred=stats.tiles_inferred)
        with _timed(timings, "write"):
            result.outputs["landcover"] = str(writers[0].close())
            result.outputs["qgis_style"] = str(write_qgis_style(lc_path.with_suffix(".qml"), classes, cfg.write.nodata))
            if len(writers) > 1:
                result.outputs["confidence"] = str(writers[1].close())
            if scores is not None:
                result.outputs["scores"] = str(scores)
            if kept is not None:
                result.outputs["tiles"] = str(kept)
        if cfg.vectorize.enabled:
            from geoseg.vectorize import vectorize_classes

            with _timed(timings, "vectorize"):
                info = vectorize_classes(lc_path, out_dir / cfg.vectorize.output, cfg.vectorize, client=client,
                                         overwrite=cfg.overwrite)
            result.outputs["vector"] = info["path"]
            result.stats["polygons"] = info["features"]
        if cfg.evaluate.reference is not None:
            from geoseg.evaluate import evaluate_iou
            from geoseg.report import write_reports

            with _timed(timings, "evaluate"):
                metrics = evaluate_iou(lc_path, cfg.evaluate, client=client)
                result.outputs.update(write_reports(metrics, out_dir, overwrite=cfg.overwrite))
            result.metrics = metrics.summary()
    return raster

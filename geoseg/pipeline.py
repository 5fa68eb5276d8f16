"""The `geoseg run` pipeline: read -> tile -> infer -> stitch -> write, with a run manifest.

Stages are plain functions in their own modules; this runner wires them to a Dask client, streams the
stitched blocks into the writers as they complete and records what happened in ``run.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import CancelledError
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from geoseg import __version__
from geoseg._io import check_overwrite, remove, write_text_atomic
from geoseg.config import PipelineConfig, dump_config, load_config
from geoseg.errors import ConfigError, GeosegError, InputError
from geoseg.models import ModelSpec, read_model_spec
from geoseg.resume import WorkDir, model_digest, output_fingerprint, run_once, work_fingerprint

log = logging.getLogger("geoseg")

LANDCOVER = "landcover.tif"
CONFIDENCE = "confidence.tif"
MANIFEST = "run.json"
STAC_ITEM = "item.json"
RESOLVED_CONFIG = "pipeline-config.json"


def check_model_fits(cfg: PipelineConfig, spec: ModelSpec, source: str) -> None:
    """Refuse impossible combinations of pipeline and model before any work starts."""
    stride = spec.output_stride
    if cfg.tile.size % stride:
        lo, hi = cfg.tile.size // stride * stride, (cfg.tile.size // stride + 1) * stride
        use = f"{hi} or {lo}" if lo else f"{hi}"
        raise ConfigError(
            f"{source}: tile.size: {cfg.tile.size} is not divisible by the model's output stride {stride}; use {use}"
        )
    if cfg.write.nodata in spec.class_map.ids:
        free = next(v for v in range(255, -1, -1) if v not in spec.class_map.ids)
        raise ConfigError(f"{source}: write.nodata: {cfg.write.nodata} is a class id of the model; use {free}")
    if cfg.read.bands is not None and len(cfg.read.bands) != spec.in_channels:
        names = ", ".join(b["name"] for b in spec.bands)
        raise ConfigError(
            f"{source}: read.bands: selects {len(cfg.read.bands)} bands but the model expects "
            f"{spec.in_channels} ({names})"
        )


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML and check it against its model checkpoint."""
    cfg = load_config(path, overrides)
    check_model_fits(cfg, read_model_spec(cfg.model), Path(path).name)
    return cfg


@dataclass
class RunResult:
    """What a run produced: output paths, timings and the manifest's path."""

    output_dir: Path
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def landcover(self) -> Path:
        return Path(self.outputs["landcover"])

    @property
    def manifest(self) -> Path:
        return self.output_dir / MANIFEST


@contextmanager
def _timed(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


def progress_bar(total: int, description: str, enabled: bool):
    """A rich progress bar on a terminal, nothing otherwise."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    progress.start()
    progress.add_task(description, total=total)
    return progress


def run_pipeline(cfg: PipelineConfig, *, client=None, progress: bool | None = None, item_id: str | None = None,  # noqa: ANN001
                 source: dict | None = None) -> RunResult:
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
    from geoseg.report import FILES as REPORT_FILES

    reports = REPORT_FILES.values() if cfg.evaluate.reference else ()
    vector = (cfg.vectorize.output,) if cfg.vectorize.enabled else ()
    # The run.json of a failed or interrupted run records that attempt; it is not an output to protect.
    manifest_is_output = previous_status(out_dir) == "done"
    stac = (STAC_ITEM,) if cfg.write.stac_item else ()
    for name in (LANDCOVER, CONFIDENCE, *([MANIFEST] if manifest_is_output else []), *reports, *vector, *stac):
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
        if "metrics" in result.stats:
            manifest["metrics"] = result.stats.pop("metrics")
        if cfg.write.stac_item:
            from geoseg.stac import stac_item

            item = stac_item(item_id or cfg.input.stem, raster, result.outputs, spec.class_map, cfg.write.nodata,
                             metrics=manifest.get("metrics"), source=source)
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


def _run_stages(cfg: PipelineConfig, spec: ModelSpec, result: RunResult, progress: bool, client):  # noqa: ANN001, ANN202
    """Every stage of one scene; returns the input's RasterSpec."""
    import dask
    from distributed import get_task_stream

    from geoseg.cluster import for_each_result, open_client, tasks_per_host
    from geoseg.grid import TileGrid
    from geoseg.infer import ModelPlugin, create_accumulator_store, infer_to_store, model_key, resolve_device
    from geoseg.read import read_raster
    from geoseg.stitch import stitch_chunk
    from geoseg.tile import create_tile_store, tile_chunk
    from geoseg.write import confidence_writer, encode_confidence, landcover_writer, write_qgis_style

    timings, out_dir = result.timings, cfg.output_dir
    with _timed(timings, "read"):
        raster = read_raster(cfg.input, cfg.read, spec)
    grid = TileGrid(raster.height, raster.width, cfg.tile.size, cfg.tile.overlap, cfg.tile.chunk_tiles)
    classes = spec.class_map
    n_classes = len(classes)
    device, precision = resolve_device(cfg.infer)
    work = WorkDir(out_dir, work_fingerprint(cfg))
    tiles_path = str(work.path / "tiles.zarr")
    acc_path = str(work.path / "accumulators.zarr")
    markers = str(work.markers)
    scores_path = out_dir / "scores.zarr"
    ny, nx = grid.chunks_shape
    result.stats.update(
        width=raster.width, height=raster.height, bands=list(raster.bands), crs=raster.crs.to_string(),
        device=device, precision=precision, chunks=[ny, nx], tile=cfg.tile.size, overlap=cfg.tile.overlap,
    )

    with ExitStack() as stack:
        import rasterio

        from geoseg.cluster import GDAL_CACHE_MB

        # The writers stream a scene-sized raster through GDAL's block cache in this process.
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
        if client is None:
            client = stack.enter_context(open_client(cfg.cluster, use_gpu=device == "cuda"))
        if cfg.cluster.dashboard and client.dashboard_link:
            log.info("Dask dashboard: %s", client.dashboard_link)
        if device == "cuda" and not _has_gpu_workers(client):
            raise InputError("infer.device: cuda needs workers started with --resources GPU=1; none found")
        # CPU tasks split a host's cores; with fewer chunks than task threads each task may use more.
        key = model_key(cfg.model, cfg.infer, min(tasks_per_host(client), ny * nx))
        # Scratch work outlives a failed or interrupted run: a rerun continues from the finished chunks.
        if not work.open():
            create_tile_store(Path(tiles_path), raster, grid)
            create_accumulator_store(acc_path, grid, n_classes)
        result.stats["chunks_resumed"] = work.count("infer")
        result.stats["chunks_inferred"] = ny * nx - result.stats["chunks_resumed"]
        if result.stats["chunks_resumed"]:
            log.info("resuming: %d of %d chunks already inferred", result.stats["chunks_resumed"], ny * nx)
        client.register_plugin(ModelPlugin(key))

        # One graph, so reading the raster into Zarr overlaps with inference: the inference of a chunk waits
        # for the tile tasks of its 3 x 3 neighbourhood (its halo lives there), not for the whole scene, and
        # stitching a chunk waits for the inference of its neighbourhood (their halos fall on its core).
        # Built from delayed tasks rather than dask.array blocks: annotations on array layers do not reach
        # the scheduler in this dask (2026.8), and the priority and GPU resource annotations must.
        token = dask.base.tokenize(tiles_path, cfg.model_dump(mode="json"), time.time())
        tiled = {(i, j): dask.delayed(run_once, pure=False)(
            markers, "tile", i, j, tile_chunk, raster, tiles_path, grid, i, j, cfg.read.nodata,
            dask_key_name=f"geoseg-tile-{token}-{i}-{j}") for i in range(ny) for j in range(nx)}
        # Longest chunks first (LPT): left to Dask's order a 9-tile chunk could start last and run alone while
        # the other threads idle (2048^2 on 2 threads: 10.5 s instead of 9.3 s of inference).
        tiles_in = grid.tiles_per_chunk()
        inferred = {}
        for (i, j), own in tiled.items():
            with dask.annotate(**_infer_annotations(device, int(tiles_in[i, j]))):
                inferred[i, j] = dask.delayed(run_once, pure=False)(
                    markers, "infer", i, j, infer_to_store, tiles_path, acc_path, grid, i, j, key, n_classes,
                    cfg.stitch.blend, own,
                    after=[tiled[n] for n in grid.neighbours(i, j)], dask_key_name=f"geoseg-infer-{token}-{i}-{j}")
        lut = classes.index_to_id()
        keep_scores = cfg.write.keep_scores
        if keep_scores:
            _create_scores_store(scores_path, raster, grid, classes, cfg.overwrite)

        def _finish(n_tiles: int, i: int, j: int, after: list) -> tuple:  # noqa: ARG001 - after: dependencies
            labels, conf, n_valid = stitch_chunk(acc_path, tiles_path, grid, i, j, lut, cfg.write.nodata,
                                                 str(scores_path) if keep_scores else None)
            return i, j, labels, conf, labels != cfg.write.nodata, n_valid, n_tiles

        # A finished stitch frees its chunk for the writer: run it before starting more inference.
        with dask.annotate(priority=1_000_000):
            tasks = [dask.delayed(_finish, pure=False)(inferred[i, j], i, j, [inferred[n] for n in grid.neighbours(i, j)],
                                                       dask_key_name=f"geoseg-stitch-{token}-{i}-{j}")
                     for i in range(ny) for j in range(nx)]

        lc_path = out_dir / LANDCOVER
        writers = [landcover_writer(lc_path, raster, classes, cfg.write.nodata, compress=cfg.write.compress,
                                    overviews=cfg.write.overviews, overwrite=cfg.overwrite)]
        stack.callback(writers[0].abort)
        if cfg.write.confidence != "none":
            writers.append(confidence_writer(out_dir / CONFIDENCE, raster, cfg.write.confidence,
                                             compress=cfg.write.compress, overviews=cfg.write.overviews,
                                             overwrite=cfg.overwrite))
            stack.callback(writers[1].abort)

        bar = progress_bar(len(tasks), "segmenting", progress)
        valid_counts = np.zeros((ny, nx), dtype=np.int64)
        tiles_inferred = 0

        def _write_block(done: tuple) -> None:
            nonlocal tiles_inferred
            i, j, labels, conf, known, n_valid, n_tiles = done
            valid_counts[i, j] = n_valid
            tiles_inferred += n_tiles
            window = grid.chunk_window(i, j)
            writers[0].write(window, labels)
            if len(writers) > 1:
                writers[1].write(window, encode_confidence(conf, known, cfg.write.confidence))
            if bar:
                bar.advance(bar.task_ids[0])

        with _timed(timings, "tile_infer_stitch"), get_task_stream(client) as stream:
            try:
                for_each_result(tasks, _write_block, client)
            finally:
                if bar:
                    bar.stop()
        result.stats["task_seconds"] = _task_seconds(stream.data, token)
        result.stats["valid_pixels"] = int(valid_counts.sum())
        result.stats["tiles_inferred"] = tiles_inferred
        with _timed(timings, "write"):
            result.outputs["landcover"] = str(writers[0].close())
            result.outputs["qgis_style"] = str(write_qgis_style(lc_path.with_suffix(".qml"), classes, cfg.write.nodata))
            if len(writers) > 1:
                result.outputs["confidence"] = str(writers[1].close())
            if keep_scores:
                result.outputs["scores"] = str(scores_path)
            if cfg.write.keep_tiles:
                kept = out_dir / "tiles.zarr"
                remove(kept)
                os.replace(tiles_path, kept)
                result.outputs["tiles"] = str(kept)
            work.close()
        if cfg.vectorize.enabled:
            from geoseg.vectorize import vectorize_classes

            with _timed(timings, "vectorize"):
                info = vectorize_classes(lc_path, out_dir / cfg.vectorize.output, vectorize_options(cfg, raster),
                                         client=client, overwrite=cfg.overwrite)
            result.outputs["vector"] = info["path"]
            result.stats["polygons"] = info["features"]
        if cfg.evaluate.reference is not None:
            from geoseg.evaluate import evaluate_iou
            from geoseg.report import write_reports

            with _timed(timings, "evaluate"):
                report = evaluate_iou(lc_path, cfg.evaluate.reference_spec(), client=client, block=cfg.evaluate.block)
                result.outputs.update(write_reports(report, out_dir, overwrite=cfg.overwrite))
            result.stats["metrics"] = {k: report[k] for k in ("mean_iou", "mean_iou_classes", "overall_accuracy",
                                                               "kappa", "frequency_weighted_iou", "pixels")}
    return raster


def _infer_annotations(device: str, n_tiles: int) -> dict[str, Any]:
    """Scheduler hints of an inference task: its work as priority; on CUDA, one GPU of its worker."""
    return {"priority": n_tiles, **({"resources": {"GPU": 1}} if device == "cuda" else {})}


def _task_seconds(records: list[dict], token: str) -> dict[str, float]:
    """Task compute seconds (summed over workers) per stage of this run (``token``), from the task stream.

    The stream also holds the tasks of other runs on the same cluster (a batch's concurrent scenes).
    """
    stages = {"tile": 0.0, "infer": 0.0, "stitch": 0.0}
    for rec in records:
        key = str(rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"])
        stage = next((s for s in stages if f"geoseg-{s}-{token}" in key), None)
        if stage is None:
            continue
        for ss in rec.get("startstops", ()):
            if ss.get("action") == "compute":
                stages[stage] += ss["stop"] - ss["start"]
    return {k: round(v, 3) for k, v in stages.items()}


def vectorize_options(cfg: PipelineConfig, raster):  # noqa: ANN001, ANN201
    """VectorizeOptions from the config; a minimum area in m2 becomes pixels on the raster's grid."""
    from geoseg.vectorize import VectorizeOptions

    v = cfg.vectorize
    px = v.min_area_px
    if v.min_area_m2 > 0:
        if not raster.crs.is_projected:
            raise ConfigError("vectorize.min_area_m2: needs a projected CRS; use vectorize.min_area_px")
        factor = raster.crs.linear_units_factor[1]
        pixel_m2 = abs(raster.transform.a * raster.transform.e) * factor**2
        px = max(px, int(np.ceil(v.min_area_m2 / pixel_m2)))
    return VectorizeOptions(layer=v.layer, connectivity=v.connectivity, min_area_px=px, simplify=v.simplify,
                            block=v.block)


def _has_gpu_workers(client) -> bool:  # noqa: ANN001
    workers = client.scheduler_info().get("workers", {}).values()
    return any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers)


def _create_scores_store(path: Path, raster, grid, classes, overwrite: bool) -> None:  # noqa: ANN001
    import zarr

    check_overwrite(path, overwrite)
    remove(path)
    arr = zarr.open_array(
        str(path), mode="w", shape=(len(classes), raster.height, raster.width), dtype="float16",
        chunks=(len(classes), grid.chunk, grid.chunk), fill_value=0, dimension_names=("class", "y", "x"),
    )
    arr.attrs.update({"classes": classes.to_records(), "proj:wkt2": raster.crs.to_wkt(),
                      "spatial:transform": list(raster.transform)[:6]})

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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg import _faults, interrupt
from geoseg._io import check_overwrite, remove, write_text_atomic
from geoseg._version import __version__
from geoseg.config import PipelineConfig, dump_config, load_config
from geoseg.errors import ConfigError, GeosegError, InputError, OutputWriteError
from geoseg.fingerprint import model_digest, output_fingerprint
from geoseg.models import ModelSpec, read_model_spec
from geoseg.progress import Progress

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.grid import RasterGrid
    from geoseg.read import Raster
    from geoseg.segment import BlockStore
    from geoseg.write import SceneWriter

log = logging.getLogger("geoseg")

MANIFEST = "run.json"
STAC_ITEM = "item.json"
RESOLVED_CONFIG = "pipeline-config.json"
WORK_DIR = ".geoseg-work"


def outputs(cfg: PipelineConfig) -> list[str]:
    """Names (inside ``cfg.output_dir``) of every file or folder a run of ``cfg`` writes, manifest last."""
    from geoseg.report import FILES as REPORT_FILES
    from geoseg.write import output_names

    names = output_names(cfg.write)
    if cfg.write.keep_scores:
        names.append("scores.zarr")
    if cfg.write.keep_tiles:
        names.append("tiles.zarr")
    if cfg.vectorize.enabled:
        names.append(cfg.vectorize.output)
        if not cfg.vectorize.output.lower().endswith(".gpkg"):
            names.append(str(Path(cfg.vectorize.output).with_suffix(".qml")))
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
    need, have = task_memory(cfg, spec), _worker_memory(cfg)
    if have and need > have / 2:
        raise ConfigError(
            f"{source}: tile.chunk_tiles: an inference task would hold about {need / 2**30:.1f} GiB ("
            f"{cfg.tile.chunk_tiles ** 2} tiles of {cfg.tile.size} px, {len(spec.classes)} classes), more than half "
            f"of a worker's {have / 2**30:.1f} GiB; use a smaller tile.chunk_tiles or tile.size")


def task_memory(cfg: PipelineConfig, spec: ModelSpec) -> int:
    """Bytes an inference task holds at least: its extent's bands and sums, its tiles' inputs and scores."""
    tiles = cfg.tile.chunk_tiles ** 2
    side = cfg.tile.chunk_tiles * (cfg.tile.size - cfg.tile.overlap) + cfg.tile.size
    channels = len(spec.classes) + 1 + spec.in_channels
    return 4 * (channels * side**2 + tiles * (len(spec.classes) + spec.in_channels) * cfg.tile.size**2)


def _worker_memory(cfg: PipelineConfig) -> int | None:
    """Memory a worker of ``cfg.cluster`` has, where the config says (None for an existing scheduler's)."""
    from dask.utils import parse_bytes

    c = cfg.cluster
    if c.backend in ("slurm", "pbs"):
        return int(parse_bytes(c.jobqueue.memory)) // c.jobqueue.processes
    if c.backend == "local":
        if c.memory_limit not in ("auto", "0", ""):
            return int(parse_bytes(c.memory_limit))
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // c.n_workers
        except (ValueError, OSError):
            return None
    return None


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
    domain: dict[str, Any] | None = None
    """The domain guard's report (:mod:`geoseg.domain`): the input's sampled statistics and any warnings."""

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


def check_paths(cfg: PipelineConfig) -> None:
    """Refuse an output that would land on one of the run's own inputs (the raster, the model, the reference)."""
    inputs = {"input": cfg.input, "model": cfg.model, "evaluate.reference": cfg.evaluate.reference}
    if cfg.cluster.tls is not None:
        inputs.update({"cluster.tls.ca_file": cfg.cluster.tls.ca_file, "cluster.tls.cert": cfg.cluster.tls.cert,
                       "cluster.tls.key": cfg.cluster.tls.key})
    resolved = {key: Path(p).resolve() for key, p in inputs.items() if p is not None}
    for name in outputs(cfg):
        target = (cfg.output_dir / name).resolve()
        for key, path in resolved.items():
            if target == path or path.is_relative_to(target):
                raise OutputWriteError(f"output_dir: {cfg.output_dir / name} would replace the run's {key} "
                                       f"({path}); write the outputs to another folder")


def run_pipeline(cfg: PipelineConfig, *, client: Client | None = None, progress: bool | None = None,
                 item_id: str | None = None, source: dict | None = None, fresh: bool | None = None,
                 spec: ModelSpec | None = None) -> RunResult:
    """Run one scene through every stage, as a transaction: all outputs appear in ``cfg.output_dir``, or none.

    The folder is locked for the run; outputs are staged and published together at the end, ``run.json``
    last. A failed or interrupted run leaves the folder's previous outputs as they were and its scratch
    work for the next run to resume (``fresh``, default ``cfg.overwrite``: start from scratch instead).
    ``client``: an existing ``distributed.Client`` to use instead of the one ``cfg.cluster`` describes.
    ``item_id`` and ``source`` name the scene's STAC Item and the item it came from (``geoseg batch``).
    ``spec``: the model's header where the caller has read it and checked it against ``cfg``
    (:func:`check_model_fits`); else it is read and checked here. Either way it is read once per run.
    """
    from geoseg.fingerprint import input_identity
    from geoseg.transaction import FolderLock, Stage

    if cfg.input is None:
        raise ConfigError("input: required key is missing (or run many scenes with geoseg batch --scenes)")
    out_dir = cfg.output_dir
    if spec is None:
        spec = read_model_spec(cfg.model)
        check_model_fits(cfg, spec, "config")
    check_paths(cfg)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"output_dir: cannot create {out_dir} ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise OutputWriteError(f"output_dir: {out_dir} is not writable")
    with FolderLock(out_dir):
        _faults.point("setup")
        stage = Stage(out_dir)
        fingerprint = output_fingerprint(cfg)
        recovered = stage.recover()
        if not cfg.overwrite and holds_run(cfg, fingerprint):
            # The same input, model and settings ran to the end here (its commit maybe completed just now).
            remove(out_dir / WORK_DIR)
            if not recovered:
                log.info("%s already holds this run's outputs (same input, model and settings); nothing to do "
                         "(--overwrite redoes it)", out_dir)
            return _finished(out_dir)
        # The run.json of a failed or interrupted run records that attempt; it is not an output to protect.
        previous_done = previous_status(out_dir) == "done"
        for name in outputs(cfg):
            if name not in (RESOLVED_CONFIG, MANIFEST) or (name == MANIFEST and previous_done):
                check_overwrite(out_dir / name, cfg.overwrite)
        if cfg.overwrite if fresh is None else fresh:
            remove(out_dir / WORK_DIR)
        staged = stage.create()
        result = RunResult(out_dir)
        identity = input_identity(cfg.input)
        manifest: dict[str, Any] = {
            "geoseg_version": __version__,
            "status": "running",
            "started": datetime.now(timezone.utc).isoformat(),
            "config": dump_config(cfg),
            "fingerprint": fingerprint,
            "inputs": {
                "raster": _describe_file(cfg.input),
                "model": {**_describe_file(cfg.model), "sha256": model_digest(cfg.model)},
            },
        }
        try:
            shown = None if progress is False else Progress(terminal=sys.stderr.isatty())
            raster = _run_stages(cfg, spec, result, shown, client, staged)
            result.outputs = {k: str(out_dir / Path(v).name) for k, v in result.outputs.items()}
            if result.metrics is not None:
                manifest["metrics"] = result.metrics
            if result.domain is not None:
                manifest["domain"] = result.domain
            if cfg.write.stac_item:
                from geoseg.stac import stac_item
                from geoseg.write import confidence_scale

                item = stac_item(item_id or cfg.input.stem, raster, result.outputs, spec.classes, cfg.write.nodata,
                                 metrics=result.metrics, source=source, staged=staged, when=cfg.write.datetime,
                                 confidence_scale=confidence_scale(cfg.write.confidence),
                                 domain_warnings=(result.domain or {}).get("warnings"))
                write_text_atomic(staged / STAC_ITEM, json.dumps(item, indent=2) + "\n")
                result.outputs["stac_item"] = str(out_dir / STAC_ITEM)
            if input_identity(cfg.input) != identity:
                raise InputError(f"{cfg.input}: changed while it was being segmented (size or modification time); "
                                 "nothing was published: rerun once it is complete")
            interrupt.check()
            manifest["status"] = "done"
            result.outputs["manifest"] = str(out_dir / MANIFEST)
            _record(staged, cfg, manifest, result)
            stage.commit(outputs(cfg))
            _faults.point("published")
            remove(out_dir / WORK_DIR)
        except BaseException as exc:
            stage.abort()
            exc = _unstaged(exc, staged, out_dir)
            # A stop request ends a run however the waits it broke report it (cancelled futures, a closed client).
            stopped = isinstance(exc, (KeyboardInterrupt, CancelledError)) or interrupt.requested()
            manifest["status"] = "interrupted" if stopped else "failed"
            manifest["error"] = str(exc) if isinstance(exc, GeosegError) else f"{type(exc).__name__}: {exc}"
            # A record of the attempt; the outputs of an earlier finished run stay exactly as they were.
            try:
                _record(out_dir / WORK_DIR if previous_done else out_dir, cfg, manifest, result)
            except OSError:
                log.error("could not record the failed attempt in %s", out_dir)
            raise exc from None
    return result


def _unstaged(exc: BaseException, staged: Path, out_dir: Path) -> BaseException:
    """``exc`` naming the output it failed on where the user will look for it, not its staged copy."""
    old, new = f"{staged}/", f"{out_dir}/"
    if isinstance(exc, GeosegError) and old in str(exc):
        return type(exc)(str(exc).replace(old, new))
    if isinstance(exc, OSError) and exc.filename and old in str(exc.filename):
        return type(exc)(exc.errno, exc.strerror, str(exc.filename).replace(old, new))
    return exc


def _record(folder: Path, cfg: PipelineConfig, manifest: dict[str, Any], result: RunResult) -> None:
    """Write ``pipeline-config.json`` and ``run.json`` into ``folder``."""
    manifest.update(finished=datetime.now(timezone.utc).isoformat(), outputs=result.outputs,
                    timings_s=result.timings, stats=result.stats)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / RESOLVED_CONFIG, json.dumps(dump_config(cfg), indent=2) + "\n")
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


def holds_run(cfg: PipelineConfig, fingerprint: str) -> bool:
    """Whether ``cfg.output_dir`` holds a finished run with this fingerprint.

    Its manifest says so, no commit is half done, and every output the run writes (:func:`outputs`) is there.
    """
    from geoseg.transaction import JOURNAL

    out_dir = cfg.output_dir
    manifest = _manifest(out_dir)
    return (manifest.get("status") == "done" and manifest.get("fingerprint") == fingerprint
            and not (out_dir / JOURNAL).exists() and all((out_dir / name).exists() for name in outputs(cfg)))


def _manifest(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(out_dir) / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _finished(out_dir: Path) -> RunResult:
    """The result of the finished run whose manifest ``out_dir`` holds."""
    manifest = _manifest(out_dir)
    names = {k: str(out_dir / Path(v).name) for k, v in dict(manifest.get("outputs", {})).items()}
    return RunResult(out_dir, names, dict(manifest.get("timings_s", {})), dict(manifest.get("stats", {})),
                     manifest.get("metrics"))


def _describe_file(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime": st.st_mtime}


def previous_status(out_dir: Path) -> str | None:
    """Status recorded in ``out_dir/run.json`` by an earlier run (done, failed, interrupted), or None."""
    return _manifest(out_dir).get("status")


def _stage(progress: Progress | None, name: str) -> AbstractContextManager[Any]:
    """A progress stage without a count (a spinner on a terminal), or nothing."""
    return progress.stage(name, None, "") if progress is not None else nullcontext()


def _run_stages(cfg: PipelineConfig, spec: ModelSpec, result: RunResult, progress: Progress | None,
                client: Client | None, staged: Path) -> Raster:
    """Every stage of one scene, its outputs written into ``staged``; returns the input's Raster."""
    import rasterio

    from geoseg.cluster import open_client
    from geoseg.read import read_raster
    from geoseg.segment import BlockStore, SegmentStats, model_key, segment_scene, tile_grid
    from geoseg.workerenv import GDAL_CACHE_MB
    from geoseg.write import SceneWriter

    assert cfg.input is not None
    timings, out_dir = result.timings, cfg.output_dir
    with _timed(timings, "read"):
        raster = read_raster(cfg.input, cfg.read, spec)
    on_workers = writes_on_workers(cfg)
    if not on_workers:
        result.domain = _domain_guard(cfg, raster, spec)
    if cfg.evaluate.reference is not None:
        from geoseg.evaluate import check_reference

        check_reference(cfg.evaluate, raster.grid)  # before any work: a bad reference fails in seconds
    device = model_key(cfg.segment, spec).device
    result.stats.update(width=raster.width, height=raster.height, bands=list(raster.bands),
                        crs=raster.grid.crs.to_string(), tile=cfg.tile.size, overlap=cfg.tile.overlap)

    with ExitStack() as stack:
        # The writers stream a scene-sized raster through GDAL's block cache in this process.
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
        if client is None:
            client = stack.enter_context(open_client(cfg.cluster, use_gpu=device == "cuda",
                                                     name=f"geoseg-{out_dir.name}"))
        if cfg.cluster.dashboard and client.dashboard_link:
            log.info("Dask dashboard: %s", client.dashboard_link)

        if on_workers:  # the guard's sample of pixels is read on a worker too
            result.domain = _domain_guard(cfg, raster, spec, client)
        writer = None
        if not on_workers:
            writer = SceneWriter(staged, raster.grid, spec.classes, cfg.write,
                                 chunk=tile_grid(raster.height, raster.width, cfg.segment).chunk)
            stack.callback(writer.abort)
        scores = staged / "scores.zarr" if cfg.write.keep_scores else None
        store = BlockStore(str(out_dir / WORK_DIR / "blocks.zarr"), cfg.write.nodata,
                           cfg.write.confidence) if on_workers else None

        stats = SegmentStats()
        kept = staged / "tiles.zarr" if cfg.write.keep_tiles else None
        # The scratch folder outlives the segmentation: a run stopped in a later stage resumes from it.
        blocks = segment_scene(raster, cfg.segment, client, out_dir / WORK_DIR, stats=stats, scores=scores,
                               keep_tiles=kept, progress=progress, cleanup=False, spec=spec, store=store)
        with _timed(timings, "tile_infer_stitch"):
            for block in blocks:
                if writer is not None:
                    assert block.labels is not None and block.confidence is not None
                    writer.write(block.window, block.labels, block.confidence)
                _faults.point("infer")
                interrupt.check()
        _faults.point("segmented")
        result.stats.update(
            device=stats.device, precision=stats.precision, chunks=list(stats.chunks),
            chunks_resumed=stats.chunks_resumed, chunks_inferred=stats.chunks_inferred,
            task_seconds=stats.task_seconds, valid_pixels=stats.valid_pixels, tiles_inferred=stats.tiles_inferred)
        if scores is not None:
            result.outputs["scores"] = str(scores)
        if kept is not None:
            result.outputs["tiles"] = str(kept)
        if writer is not None:
            done = finish_scene(cfg, spec, raster.grid, staged, writer, client=client, progress=progress)
        else:
            assert store is not None
            done = _finish_on_a_worker(client, cfg, spec, raster.grid, staged, store, progress)
        result.outputs.update(done.outputs)
        timings.update(done.timings)
        if done.polygons is not None:
            result.stats["polygons"] = done.polygons
        result.metrics = done.metrics
    return raster


def writes_on_workers(cfg: PipelineConfig) -> bool:
    """Whether a run of ``cfg`` writes its outputs on the workers (``write.on_workers``, auto resolved)."""
    on = cfg.write.on_workers
    return cfg.cluster.backend != "local" if on == "auto" else bool(on)


@dataclass
class Finished:
    """What the stages after the segmentation produced: outputs by name, timings, polygons, metrics."""

    outputs: dict[str, str]
    timings: dict[str, float]
    polygons: int | None = None
    metrics: dict[str, Any] | None = None


def finish_scene(cfg: PipelineConfig, spec: ModelSpec, grid: RasterGrid, staged: Path, writer: SceneWriter, *,
                 client: Client | None = None, progress: Progress | None = None,
                 later: AbstractContextManager[Client] | None = None) -> Finished:
    """The stages after the segmentation, into ``staged``: finish the COGs of ``writer``, vectorize, evaluate.

    ``client``: the cluster the vectorize and evaluate tasks run on (None: local threads); ``later``: a
    context that gives that client, entered once the COGs are written (a worker task's own client).
    """
    assert cfg.input is not None
    timings: dict[str, float] = {}
    done = Finished({}, timings)
    lc_path = writer.landcover
    with _timed(timings, "write"), _stage(progress, "writing the COG (tiles, overviews)"):
        done.outputs.update(writer.close())
    if not (cfg.vectorize.enabled or cfg.evaluate.reference is not None):
        return done
    with later if later is not None else nullcontext(client) as client:
        if cfg.vectorize.enabled:
            from geoseg.vectorize import vectorize_classes

            with _timed(timings, "vectorize"):
                info = vectorize_classes(lc_path, staged / cfg.vectorize.output, cfg.vectorize, client=client,
                                         timestamp=_timestamp(cfg.input), progress=progress)
            done.outputs["vector"] = info["path"]
            if info["style"]:
                done.outputs["vector_style"] = info["style"]
            done.polygons = info["features"]
        if cfg.evaluate.reference is not None:
            from geoseg.evaluate import evaluate_iou
            from geoseg.report import write_reports

            with _timed(timings, "evaluate"):
                metrics = replace(evaluate_iou(lc_path, cfg.evaluate, client=client, progress=progress),
                                  prediction=str(cfg.output_dir / lc_path.name))  # where it will be, not staged
                _faults.point("evaluate")
                done.outputs.update(write_reports(metrics, staged))
            done.metrics = metrics.summary()
    return done


def finish_stored(cfg: PipelineConfig, spec: ModelSpec, grid: RasterGrid, staged: str, store: BlockStore,
                  remote: tuple[str, int] | None = None) -> Finished:
    """:func:`finish_scene` from the blocks the stitch tasks stored: one Dask task on a worker.

    Its vectorize and evaluate tasks go to the whole cluster through the worker's own client (the task
    secedes from the worker's threads meanwhile), as the client's would. ``remote``: the client's fault
    point (:func:`geoseg._faults.arm`).
    """
    import rasterio
    from distributed import worker_client

    from geoseg.segment import tile_grid
    from geoseg.workerenv import GDAL_CACHE_MB
    from geoseg.write import SceneWriter

    with _faults.arm(remote), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        chunks = tile_grid(grid.height, grid.width, cfg.segment)
        writer = SceneWriter(Path(staged), grid, spec.classes, cfg.write, chunk=chunks.chunk)
        try:
            t0 = time.perf_counter()
            for window, labels, conf in store.blocks(chunks):
                writer.write_encoded(window, labels, conf)
            reading = time.perf_counter() - t0
            # The COGs are written on this task's thread; the later stages' tasks run on the whole cluster
            # while it waits for them seceded from the worker's threads.
            done = finish_scene(cfg, spec, grid, Path(staged), writer, later=worker_client())
            done.timings["write"] = round(done.timings["write"] + reading, 3)  # the blocks' copy included
            return done
        finally:
            writer.abort()


def _without_context(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, a geoseg error re-raised alone (runs in a worker task)."""
    error = None
    try:
        return fn(*args)
    except GeosegError as exc:
        # As in run_once: Dask ships an exception with its context chain, and one holding a GDAL error does
        # not pickle; the user's one-line error travels alone.
        error = type(exc)(*exc.args)
    raise error


def _on_a_worker(client: Client, key: str, fn: Callable[..., Any], *args: Any, shown: str | None = None,
                 progress: Progress | None = None) -> Any:
    """``fn(*args)`` as one task on a worker, waited for with stop requests and the workers' health checked.

    ``shown``: the progress stage meanwhile.
    """
    from geoseg.cluster import completed

    future = client.submit(_without_context, fn, *args, pure=False, key=f"geoseg-{key}-{time.time_ns()}")
    try:
        with _stage(progress if shown else None, shown or ""):
            for _ in completed(client, [future]):
                pass
        return future.result()
    finally:
        future.release()


def _finish_on_a_worker(client: Client, cfg: PipelineConfig, spec: ModelSpec, grid: RasterGrid, staged: Path,
                        store: BlockStore, progress: Progress | None) -> Finished:
    """Run :func:`finish_stored` on a worker and wait for it."""
    return _on_a_worker(client, f"finish-{cfg.output_dir.name}", finish_stored, cfg, spec, grid, str(staged), store,
                        _faults.armed(), shown="writing the outputs on a worker", progress=progress)


def domain_report(raster: Raster, spec: ModelSpec, explicit_bands: bool) -> dict[str, Any]:
    """The domain guard's report on ``raster`` (:func:`geoseg.domain.check_domain`) as ``run.json`` records it."""
    import rasterio

    from geoseg.domain import check_domain

    with rasterio.open(raster.path) as src:
        return check_domain(raster, spec, src, explicit_bands=explicit_bands).to_dict()


def _domain_guard(cfg: PipelineConfig, raster: Raster, spec: ModelSpec, client: Client | None = None
                  ) -> dict[str, Any]:
    """Warn once (or refuse, with ``read.strict``) when the input is unlike the model's training data.

    With ``client``, its sample of pixels is read on a worker.
    """
    explicit = cfg.read.bands is not None
    if client is None:
        report = domain_report(raster, spec, explicit)
    else:
        report = _on_a_worker(client, f"domain-{cfg.output_dir.name}", domain_report, raster, spec, explicit)
    if report["warnings"]:
        what = "; ".join(report["warnings"])
        if cfg.read.strict:
            raise InputError(f"{cfg.input}: unlike the data the model was trained on: {what}; the map would not "
                             "be trustworthy (read.strict: false to run anyway)")
        log.warning("%s: unlike the data the model was trained on: %s; check the map before using it "
                    "(read.strict: true refuses such input)", cfg.input, what)
    return report


def _timestamp(path: Path) -> datetime:
    """The time stamped into outputs that record one (GeoPackage): the input's, so reruns are byte-identical."""
    return datetime.fromtimestamp(int(path.stat().st_mtime), timezone.utc)

"""The scene graph: tile -> infer -> stitch over a scene, on Dask, yielding stitched blocks of class ids.

:func:`segment_scene` builds one Dask graph over the scene's chunks: a tile task copies a chunk of the input
into the tile store (:mod:`.tiles`); the inference task of a chunk waits for the tile tasks of its 3 x 3
neighbourhood (its tiles' context lives there), runs the worker's model (:mod:`.predict`) and stores its
weighted probability sums (:mod:`.accumulate`); the stitch task of a chunk waits for its neighbours'
inference, adds their pieces onto its window and picks the classes. Blocks are yielded as they finish, so
the writer streams them while inference goes on. Tile and inference tasks leave completion markers in the
scratch folder (:mod:`.scratch`), from which an interrupted run resumes.

:func:`predict_array` runs the very same tiling and blending on an array in memory (model validation).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from geoseg.config import SegmentConfig, dump_config
from geoseg.errors import InputError
from geoseg.fingerprint import digest, input_identity, model_digest
from geoseg.grid import TileGrid
from geoseg.read import Raster
from geoseg.segment.accumulate import AccumulatorLayout
from geoseg.segment.blocks import BlockStore
from geoseg.segment.predict import ModelKey, model_on_workers
from geoseg.segment.refine import guide_image, halo
from geoseg.segment.scratch import Scratch, run_once
from geoseg.segment.tasks import (
    InferSettings,
    RefineSettings,
    blend_tiles,
    classify,
    infer_chunk,
    refine_sums,
    stitch_chunk,
    tiles_to_infer,
)
from geoseg.segment.tiles import create_tile_store, tile_store_matches, write_chunk

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.models import ModelSpec
    from geoseg.progress import Progress

__all__ = ["Block", "BlockStore", "SegmentStats", "model_key", "predict_array", "segment_scene", "tile_grid"]

log = logging.getLogger("geoseg")


@dataclass(frozen=True)
class Block:
    """One stitched chunk: class ids (``nodata`` where invalid) and top probability on ``window``."""

    window: Window
    labels: np.ndarray | None
    """None where the stitch task stored the chunk in the scene's :class:`BlockStore` instead."""
    confidence: np.ndarray | None
    valid_pixels: int
    tiles: int


@dataclass
class SegmentStats:
    """What a scene graph did; filled in as it runs."""

    device: str = ""
    precision: str = ""
    chunks: tuple[int, int] = (0, 0)
    chunks_resumed: int = 0
    chunks_inferred: int = 0
    tiles_inferred: int = 0
    valid_pixels: int = 0
    task_seconds: dict[str, float] = field(default_factory=dict)


def tile_grid(raster_height: int, raster_width: int, cfg: SegmentConfig) -> TileGrid:
    """The tile grid of a scene under ``cfg``."""
    return TileGrid(raster_height, raster_width, cfg.tile.size, cfg.tile.overlap, cfg.tile.chunk_tiles)


def model_key(cfg: SegmentConfig, spec: ModelSpec | None = None) -> ModelKey:
    """What identifies the loaded model of ``cfg`` on a worker: device, precision and memory format resolved.

    ``precision: auto`` on the CPU is bf16 where the CPU computes it natively and the checkpoint passed the
    bf16 guard, else fp32 (:func:`geoseg.device.auto_cpu_precision`); ``channels_last`` unset is on.
    ``spec``: the checkpoint's header where the caller has it (else it is read when needed).
    """
    from geoseg.device import auto_cpu_precision, resolve_device
    from geoseg.models import read_model_spec

    device, precision = resolve_device(cfg.infer.device, cfg.infer.precision, local=False)
    if device == "cpu" and cfg.infer.precision == "auto":
        spec = spec or read_model_spec(cfg.model)
        precision = auto_cpu_precision(spec.provenance.get("precision_check", {}))
    channels_last = True if cfg.infer.channels_last is None else cfg.infer.channels_last
    return ModelKey(str(cfg.model), model_digest(cfg.model), device, precision, channels_last)


def work_fingerprint(raster: Raster, cfg: SegmentConfig) -> str:
    """What decides the scratch stores: a scratch folder is resumed only when this matches."""
    from geoseg._version import __version__

    settings = dump_config(cfg)
    settings.pop("model")
    return digest({"geoseg": __version__, "input": input_identity(raster.path), "bands": raster.bands,
                   "nodata": raster.nodata, "nodata_override": raster.nodata_override, "scales": raster.scales,
                   "model": model_digest(cfg.model), "config": settings})


def segment_scene(raster: Raster, cfg: SegmentConfig, client: Client, workdir: Path, *,
                  stats: SegmentStats | None = None, scores: Path | None = None, keep_tiles: Path | None = None,
                  progress: Progress | None = None, cleanup: bool = True, spec: ModelSpec | None = None,
                  store: BlockStore | None = None) -> Iterator[Block]:
    """Run the tile/infer/stitch graph of ``raster`` on ``client``; yield its stitched blocks as they finish.

    ``workdir`` is the scratch folder: resumed when it holds this work, and removed once every block has
    been yielded unless ``cleanup`` is False (the caller removes it when its own later stages are done).
    ``stats`` is filled in as the graph runs; ``scores`` keeps the class probabilities as Zarr there,
    ``keep_tiles`` moves the tile store there at the end. ``progress`` shows the tiles inferred (counted as
    each batch finishes on a worker; a resumed chunk's tiles count as done from the start). ``spec``: the
    checkpoint's header where the caller has read it (else it is read here). ``store``: the stitch tasks
    store their chunks there, on the workers, and the blocks yielded carry no arrays (the outputs are then
    written from the store, :func:`geoseg.write.write_stored`); made afresh here.
    """
    import dask

    from geoseg.cluster import iter_results, tasks_per_host
    from geoseg.models import read_model_spec

    stats = stats if stats is not None else SegmentStats()
    spec = spec or read_model_spec(cfg.model)
    grid = tile_grid(raster.height, raster.width, cfg)
    layout = AccumulatorLayout(grid, len(spec.classes))
    key = model_key(cfg, spec)
    device, precision = key.device, key.precision
    if device == "cuda" and not _has_gpu_workers(client):
        raise InputError("infer.device: cuda needs workers started with --resources GPU=1; none found")
    ny, nx = grid.chunks_shape
    stats.device, stats.precision, stats.chunks = device, precision, (ny, nx)
    per_host, limited = tasks_per_host(client)
    # The keys name the scene (its output folder), so the dashboard and task stream tell scenes apart.
    label = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(workdir).absolute().parent.name)[:48]
    token = f"{label}.{dask.base.tokenize(str(workdir), dump_config(cfg), time.time())[:16]}"
    topic = f"geoseg-progress-{token}"
    settings = InferSettings(cfg.infer.batch_size, cfg.infer.tta, _threads(cfg, device, per_host, ny * nx),
                             blend=cfg.stitch.blend, topic=topic)

    def create(s: Scratch) -> None:
        create_tile_store(s.tiles, raster, grid)
        layout.create(str(s.accumulators))

    scratch = Scratch(workdir, work_fingerprint(raster, cfg))
    scratch.open(lambda s: tile_store_matches(s.tiles, raster, grid) and layout.matches(str(s.accumulators)),
                 create)
    tiles_path, acc_path, markers = str(scratch.tiles), str(scratch.accumulators), str(scratch.markers)
    stats.chunks_resumed = scratch.count("infer")
    stats.chunks_inferred = ny * nx - stats.chunks_resumed
    if stats.chunks_resumed:
        log.info("resuming: %d of %d chunks already inferred", stats.chunks_resumed, ny * nx)
    if scores is not None:
        from geoseg.segment.scores import create_scores_store

        create_scores_store(scores, raster.grid, grid, spec.classes)
    lut = spec.classes.index_to_id()
    if store is not None:
        store.create(grid)

    tiles_in = grid.tiles_per_chunk()
    scores_path = str(scores) if scores is not None else None
    refine = refine_settings(cfg, spec)
    grown = halo(refine.radius) if refine is not None else 0

    def waits_for(i: int, j: int) -> list[tuple[int, int]]:
        """The chunks whose inference the stitch of ``(i, j)`` needs besides its own (a halo may add some)."""
        return sorted(set(grid.neighbours(i, j)) | set(layout.sources(i, j, grown)) - {(i, j)})

    def finish(n_tiles: int, i: int, j: int, after: list) -> Block:  # noqa: ARG001 - after: dependencies
        labels, conf, n_valid = stitch_chunk(acc_path, tiles_path, layout, i, j, lut, cfg.nodata, scores_path,
                                             refine)
        window = grid.chunk_window(i, j)
        if store is None:
            return Block(window, labels, conf, n_valid, n_tiles)
        store.store(window, labels, conf)
        return Block(window, None, None, n_valid, n_tiles)

    def submit_graph() -> list:
        """Submit every task of the scene; returns the stitch futures (they hold the others)."""
        # One graph, so reading the raster into Zarr overlaps with inference: the inference of a chunk waits
        # for the tile tasks of its 3 x 3 neighbourhood, not for the whole scene, and stitching a chunk waits
        # for the inference of its neighbourhood. Each task is submitted with its own priority and resources:
        # dask.annotate on delayed tasks also annotated their dependencies in this dask (2026.8), and the
        # tile tasks held the inference slot meant for inference alone.
        submit = client.submit
        tiled = {(i, j): submit(run_once, markers, "tile", i, j, write_chunk, raster, tiles_path, grid, i, j,
                                key=f"geoseg-tile-{token}-{i}-{j}") for i in range(ny) for j in range(nx)}
        # Longest chunks first (LPT): left to Dask's order a 9-tile chunk could start last and run alone
        # while the other threads idle (2048^2 on 2 threads: 10.5 s instead of 9.3 s of inference).
        inferred = {(i, j): submit(run_once, markers, "infer", i, j, infer_chunk, tiles_path, acc_path, layout,
                                   i, j, key, settings, own, after=[tiled[n] for n in grid.neighbours(i, j)],
                                   key=f"geoseg-infer-{token}-{i}-{j}",
                                   **infer_annotations(device, int(tiles_in[i, j]), limited))
                    for (i, j), own in tiled.items()}
        # A finished stitch frees its chunk for the writer: run it before starting more inference.
        return [submit(finish, inferred[i, j], i, j, [inferred[n] for n in waits_for(i, j)],
                       key=f"geoseg-stitch-{token}-{i}-{j}", priority=1_000_000)
                for i in range(ny) for j in range(nx)]

    done_chunks = {(int(m.name.split("-")[1]), int(m.name.split("-")[2])) for m in scratch.markers.glob("infer-*")}
    resumed = int(sum(tiles_in[c] for c in done_chunks))
    with ExitStack() as stack:
        stack.enter_context(model_on_workers(client, key))
        stream = stack.enter_context(_task_stream(client))
        if progress is not None:
            stage = stack.enter_context(progress.stage("segmenting", int(tiles_in.sum()), "tiles", done=resumed))
            client.subscribe_topic(topic, lambda event: stage.advance(int(event[1])))
            stack.callback(client.unsubscribe_topic, topic)
        for block in iter_results(submit_graph(), client):
            stats.tiles_inferred += block.tiles
            stats.valid_pixels += block.valid_pixels
            yield block
    stats.task_seconds = _task_seconds(stream.data, token)
    if keep_tiles is not None:
        from geoseg._io import remove

        remove(keep_tiles)
        os.replace(scratch.tiles, keep_tiles)
    if cleanup:
        scratch.close()


def refine_settings(cfg: SegmentConfig, spec: ModelSpec) -> RefineSettings | None:
    """The boundary refinement ``cfg.stitch.refine`` asks for, with the checkpoint's normalisation (None: off)."""
    r = cfg.stitch.refine
    if r.method == "none":
        return None
    return RefineSettings(r.radius, r.eps, tuple(spec.mean), tuple(spec.std))


@contextmanager
def _task_stream(client: Client) -> Iterator[Any]:
    """``distributed.get_task_stream`` whose exit is skipped once the client has closed.

    A scene's generator can be finalised after its batch's client closed (a batch stopped by SIGTERM):
    the stream's exit would then raise from a closed client, and there is no stream left to read.
    """
    from distributed import get_task_stream

    stream = get_task_stream(client)
    stream.__enter__()
    try:
        yield stream
    finally:
        if client.status == "running":
            stream.__exit__(None, None, None)


def infer_annotations(device: str, n_tiles: int, limited: bool = False) -> dict[str, Any]:
    """Scheduler hints of an inference task.

    Its work as priority; an INFER slot of its worker where the workers offer them; on CUDA, one GPU.
    """
    from geoseg.workerenv import INFER

    resources = {**({INFER: 1} if limited else {}), **({"GPU": 1} if device == "cuda" else {})}
    return {"priority": n_tiles, **({"resources": resources} if resources else {})}


def _threads(cfg: SegmentConfig, device: str, per_host: int, n_chunks: int) -> int | None:
    """Intra-op threads per inference task: CPU tasks split a host's cores; fewer chunks than slots use more."""
    if cfg.infer.torch_threads is not None or device != "cpu":
        return cfg.infer.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, min(per_host, n_chunks)))


def _has_gpu_workers(client: Client) -> bool:
    workers = client.scheduler_info().get("workers", {}).values()
    return any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers)


def _task_seconds(records: list[dict], token: str) -> dict[str, float]:
    """Task compute seconds (summed over workers) per stage of this graph (``token``), from the task stream.

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


def predict_array(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, valid: np.ndarray, spec: ModelSpec,
                  cfg: SegmentConfig) -> np.ndarray:
    """Class indexes of a normalised image ``x`` (bands, H, W) with the tiling and blending of ``geoseg run``.

    The same tiles, weights and sums as :func:`segment_scene` on a scene of this size (all of it one chunk),
    computed in memory: what model validation uses, so a checkpoint is chosen on what users will run.
    ``predict`` maps a batch of normalised tiles to class probabilities. Invalid pixels get -1.
    """
    from geoseg.grid import pad_to

    _, h, w = x.shape
    grid = tile_grid(h, w, cfg)
    whole = TileGrid(h, w, cfg.tile.size, cfg.tile.overlap, max(grid.tiles_shape))  # one chunk: every tile
    extent = whole.chunk_extent(0, 0)
    assert extent is not None
    inside = whole.clip(extent)
    before = (int(inside.row_off - extent.row_off), int(inside.col_off - extent.col_off))
    after = (int(extent.row_off + extent.height) - h, int(extent.col_off + extent.width) - w)
    xp, vp = pad_to(x, before, after), pad_to(valid, before, after)
    todo = tiles_to_infer(whole.tiles_of(0, 0), extent, vp)
    sums = blend_tiles(predict, xp, todo, extent, Window(0, 0, w, h), whole, len(spec.classes), cfg.stitch.blend)
    refine = refine_settings(cfg, spec)
    if refine is not None:  # x is normalised as the refinement's guide normalises
        sums = refine_sums(sums, guide_image(x), valid, refine.radius, refine.eps)
    labels, _ = classify(sums, valid, np.arange(len(spec.classes), dtype=np.uint8), 255)
    return np.where(labels == 255, -1, labels.astype(np.int64))

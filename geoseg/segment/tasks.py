"""What one chunk's tasks compute: tile sums on arrays, the inference and stitch tasks around them, classes.

:func:`blend_tiles` is the numerical heart shared by the Dask graph (:func:`infer_chunk`) and the in-memory
path that validates models during training (:func:`geoseg.segment.predict_array`): both blend exactly the
same tiles with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from geoseg.grid import Tile, TileGrid, relative, tile_weights
from geoseg.segment.accumulate import AccumulatorLayout
from geoseg.segment.predict import ModelKey, get_predictor
from geoseg.segment.refine import guide_image, guided_filter, halo
from geoseg.segment.tiles import read_array, read_extent, zarr_array


@dataclass(frozen=True)
class InferSettings:
    """Per-call inference settings (not part of a loaded model's identity)."""

    batch_size: int = 4
    tta: str = "none"
    """A key of :data:`geoseg.segment.predict.TTA_VIEWS`."""
    threads: int | None = None
    """Intra-op threads of each inference task (None: torch's default). Fixed, never adapted to how many
    tasks run at once: some models' forward pass is not bit-identical across thread counts, and results
    must not depend on timing."""
    blend: str = "crop"
    on_device: bool = False
    """Normalise, blend and accumulate where the model runs (always on CUDA; on the CPU for tests)."""
    topic: str | None = None
    """Worker event topic that hears of every batch inferred (the client's progress bar)."""


def _tiles_done(topic: str | None) -> Callable[[int], None] | None:
    """A callback telling the client ``n`` more tiles are inferred, through a worker event (None off a worker)."""
    if topic is None:
        return None
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not in a Dask worker (the local-threads path)
        return None
    return lambda n: worker.log_event(topic, n)


def tiles_to_infer(tiles: list[Tile], extent: Window, valid: np.ndarray) -> list[Tile]:
    """The tiles whose core holds a valid pixel (``valid`` covers ``extent``): a rule independent of chunking."""
    todo = []
    for t in tiles:
        r0, c0 = int(t.core.row_off - extent.row_off), int(t.core.col_off - extent.col_off)
        if valid[r0 : r0 + int(t.core.height), c0 : c0 + int(t.core.width)].any():
            todo.append(t)
    return todo


def blend_tiles(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tiles: list[Tile], extent: Window,
                out: Window, grid: TileGrid, n_classes: int, blend: str) -> np.ndarray:
    """Weighted probability sums of ``tiles`` on the window ``out``.

    ``x`` holds the normalised bands on ``extent`` (which contains every tile window); ``predict`` maps a
    batch of tiles to class probabilities. Channel ``k < n_classes`` of the result is ``sum(w * p_k)``, the
    last is ``sum(w)``. Tile pixels outside ``out`` (beyond the scene) are dropped.
    """
    size = grid.size
    sums = np.zeros((n_classes + 1, int(out.height), int(out.width)), dtype=np.float32)
    if not tiles:
        return sums
    rel = [(int(t.window.row_off - extent.row_off), int(t.window.col_off - extent.col_off)) for t in tiles]
    probs = predict(np.stack([x[:, r : r + size, c : c + size] for r, c in rel]))
    o_r0, o_c0 = int(out.row_off), int(out.col_off)
    o_r1, o_c1 = o_r0 + int(out.height), o_c0 + int(out.width)
    for t, p in zip(tiles, probs):
        w = tile_weights(t, size, grid.overlap, blend)
        r0, c0 = int(t.window.row_off), int(t.window.col_off)
        rr0, cc0 = max(r0, o_r0), max(c0, o_c0)
        rr1, cc1 = min(r0 + size, o_r1), min(c0 + size, o_c1)
        if rr0 >= rr1 or cc0 >= cc1:
            continue
        src = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
        dst = (slice(rr0 - o_r0, rr1 - o_r0), slice(cc0 - o_c0, cc1 - o_c0))
        ww = w[src]
        sums[(slice(None, n_classes), *dst)] += p[(slice(None), *src)] * ww
        sums[(n_classes, *dst)] += ww
    return sums


def infer_chunk(tiles_path: str, acc_path: str, layout: AccumulatorLayout, i: int, j: int, key: ModelKey,
                settings: InferSettings, core_valid: int, after: object = None) -> int:
    """Infer chunk ``(i, j)``'s tiles and store its sums; return the number of tiles inferred.

    ``core_valid`` is the chunk's valid-pixel count from its tile task: a chunk without one never loads
    the model. ``after`` is unused: the neighbours' tile tasks passed there make the graph wait for them.
    """
    grid = layout.grid
    extent, out = grid.chunk_extent(i, j), layout.extent(i, j)
    if extent is None or out is None:
        return 0
    todo: list[Tile] = []
    if core_valid:
        data, valid = read_extent(tiles_path, grid, extent)
        todo = tiles_to_infer(grid.tiles_of(i, j), extent, valid)  # cores lie inside the scene, never padding
    if not todo:
        sums = np.zeros((layout.channels, int(out.height), int(out.width)), dtype=np.float32)
    else:
        predictor = get_predictor(key)
        threads, done = settings.threads, _tiles_done(settings.topic)
        if settings.on_device or predictor.device.type == "cuda":
            offsets = [(int(t.window.row_off - extent.row_off), int(t.window.col_off - extent.col_off)) for t in todo]
            weights = [tile_weights(t, grid.size, grid.overlap, settings.blend) for t in todo]
            box = (int(out.row_off - extent.row_off), int(out.col_off - extent.col_off), int(out.height),
                   int(out.width))
            sums = predictor.blend_on_device(data, valid, offsets, weights, box, settings.batch_size, settings.tta,
                                             threads, done=done)
        else:
            x = predictor.normalize(data, valid)
            sums = blend_tiles(lambda b: predictor.predict(b, settings.batch_size, settings.tta, threads, done=done),
                               x, todo, extent, out, grid, layout.n_classes, settings.blend)
    layout.store(acc_path, i, j, sums)
    return len(todo)


def classify(acc: np.ndarray, valid: np.ndarray, lut: np.ndarray, nodata: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (uint8) and top probability (float32) from merged sums.

    Invalid pixels, and pixels no tile predicted, get ``nodata`` and confidence 0.
    """
    weight = acc[-1]
    known = valid & (weight > 0)
    # A pixel's weight divides all its class sums alike: the argmax of the sums is the class, and only the
    # top sum needs dividing (3.6x faster than normalising every class first).
    index = acc[:-1].argmax(axis=0)
    labels = np.where(known, lut[index], np.uint8(nodata)).astype(np.uint8)
    top = np.take_along_axis(acc[:-1], index[None], axis=0)[0]
    conf = np.where(known, top / np.where(known, weight, 1.0), 0.0).astype(np.float32)
    return labels, conf


@dataclass(frozen=True)
class RefineSettings:
    """Boundary refinement of a scene (:mod:`geoseg.segment.refine`) with the checkpoint's normalisation."""

    radius: int
    eps: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def guide(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The guide of raw bands, normalised as the predictor normalises them (nodata 0)."""
        x = (data.astype(np.float32) - np.asarray(self.mean, np.float32)[:, None, None]) / np.asarray(
            self.std, np.float32)[:, None, None]
        x[:, ~valid] = 0.0
        return guide_image(x)


def refine_sums(acc: np.ndarray, guide: np.ndarray, valid: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Merged sums turned into refined sums: guided-filtered probabilities, weight 1 where a pixel is known.

    What :func:`classify` then reads as any sums; the result on a pixel depends on the pixels within
    ``halo(radius)`` of it only, so a chunk read with that halo gives the whole-scene bits.
    """
    known = valid & (acc[-1] > 0)
    probs = acc[:-1] / np.where(known, acc[-1], 1)
    q = guided_filter(probs, guide, known, radius, eps)
    return np.concatenate([q, known[None].astype(np.float32)])


def stitch_chunk(acc_path: str, tiles_path: str, layout: AccumulatorLayout, i: int, j: int, lut: np.ndarray,
                 nodata: int, scores_path: str | None = None,
                 refine: RefineSettings | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Class ids, top probability and valid-pixel count of chunk ``(i, j)``; optionally store probabilities.

    With ``refine``, the sums are read with a halo, refined, and cut back to the chunk's window.
    """
    window = layout.grid.chunk_window(i, j)
    if refine is None:
        acc, _ = layout.merge(acc_path, i, j)
        valid = read_array(zarr_array(tiles_path, "valid"), window.toslices())
    else:
        acc, grown = layout.merge(acc_path, i, j, halo(refine.radius))
        rows, cols = grown.toslices()
        valid = read_array(zarr_array(tiles_path, "valid"), (rows, cols))
        data = read_array(zarr_array(tiles_path, "image"), (slice(None), rows, cols))
        inner = relative(window, grown)
        acc = refine_sums(acc, refine.guide(data, valid), valid, refine.radius, refine.eps)[(slice(None), *inner)]
        valid = valid[inner]
    labels, conf = classify(acc, valid, lut, nodata)
    if scores_path is not None:
        from geoseg.segment.scores import write_scores

        write_scores(scores_path, window, acc)
    return labels, conf, int(valid.sum())

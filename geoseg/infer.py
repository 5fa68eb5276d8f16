"""Infer stage: per-chunk batched model inference on Dask workers.

Each Dask task reads one chunk's *extended* window (its tiles plus their halos) from the Zarr tile store,
runs the model on its tiles in batches and sums the window-weighted class probabilities over the chunk's
tiles, with the weight sum as the last channel. The sums go to a Zarr accumulator store: the core, and
the halo as four strips that :mod:`geoseg.stitch` adds onto the neighbours' cores. The model lives in the
worker (``ModelPlugin``), never in the task graph.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from distributed.diagnostics.plugin import WorkerPlugin
from rasterio.windows import Window

from geoseg.config import InferConfig
from geoseg.grid import TileGrid, blend_weights, pad_to
from geoseg.tile import scratch_compressors

_MODELS: dict[str, Predictor] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelKey:
    """Identifies a loaded model on a worker: checkpoint, device and numerics."""

    checkpoint: str
    device: str
    precision: str
    channels_last: bool
    tta: bool
    batch_size: int
    threads: int | None

    @property
    def token(self) -> str:
        st = os.stat(self.checkpoint)
        return f"{self.checkpoint}:{st.st_mtime_ns}:{st.st_size}:{self!r}"


def resolve_device(cfg: InferConfig) -> tuple[str, str]:
    """(device, precision) after resolving 'auto'."""
    if cfg.device == "cpu":  # no torch import in the client process when nothing needs probing
        return "cpu", "fp32" if cfg.precision == "auto" else cfg.precision
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = cfg.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return device, precision


class Predictor:
    """A model on a device with its input normalisation: numpy tiles in, class probabilities out."""

    def __init__(self, key: ModelKey):
        import torch

        from geoseg.models import build_model, load_checkpoint

        if key.threads:
            torch.set_num_threads(key.threads)
        spec, state = load_checkpoint(key.checkpoint)
        self.spec = spec
        self.key = key
        self.device = torch.device(key.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(key.precision)
        self.memory_format = torch.channels_last if key.channels_last else torch.contiguous_format
        self.model = build_model(spec, state).to(self.device, memory_format=self.memory_format)
        self.mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(spec.std, dtype=np.float32)[:, None, None]

    def normalize(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Checkpoint normalisation; invalid pixels become 0 (the band mean)."""
        x = (data.astype(np.float32) - self.mean) / self.std
        x[:, ~valid] = 0.0
        return x

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes, H, W) float32 for normalised tiles (N, bands, H, W)."""
        import torch

        out = np.empty((tiles.shape[0], len(self.spec.classes), *tiles.shape[2:]), dtype=np.float32)
        bs = self.key.batch_size
        with torch.inference_mode():
            for s in range(0, len(tiles), bs):
                x = torch.from_numpy(tiles[s : s + bs]).to(self.device, non_blocking=True)
                x = x.contiguous(memory_format=self.memory_format)
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    logits = self.model(x).float()
                    if self.key.tta:
                        for dims in ((-1,), (-2,), (-2, -1)):
                            logits += self.model(x.flip(dims)).float().flip(dims)
                        logits /= 4
                out[s : s + bs] = torch.softmax(logits, dim=1).cpu().numpy()
        return out


def get_predictor(key: ModelKey) -> Predictor:
    """The worker's predictor for ``key``, loading it on first use (once per process)."""
    token = key.token
    with _LOCK:
        if token not in _MODELS:
            _MODELS.clear()  # one model per worker: a new checkpoint replaces the old one
            _MODELS[token] = Predictor(key)
        return _MODELS[token]


class ModelPlugin(WorkerPlugin):
    """Loads the model once when a worker starts (or joins later) and frees it at teardown."""

    idempotent = True

    def __init__(self, key: ModelKey):
        self.key = key
        self.name = f"geoseg-model-{abs(hash(key.token))}"

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        get_predictor(self.key)

    def teardown(self, worker) -> None:  # noqa: ANN001
        with _LOCK:
            _MODELS.pop(self.key.token, None)


def read_extended(tiles_path: str, grid: TileGrid, core: Window) -> tuple[np.ndarray, np.ndarray]:
    """Read a chunk's extended window from the tile store, reflect-padded at the scene border."""
    group = zarr.open_group(tiles_path, mode="r")
    ext = grid.extended_window(core)
    r0, c0 = int(ext.row_off), int(ext.col_off)
    r1, c1 = r0 + int(ext.height), c0 + int(ext.width)
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r1, grid.height), min(c1, grid.width)
    data = group["image"][:, rr0:rr1, cc0:cc1]
    valid = group["valid"][rr0:rr1, cc0:cc1]
    before, after = (rr0 - r0, cc0 - c0), (r1 - rr1, c1 - cc1)
    return pad_to(data, before, after), pad_to(valid, before, after)


def infer_chunk(
    tiles_path: str, grid: TileGrid, i: int, j: int, key: ModelKey, n_classes: int, blend: str, core_valid: int
) -> tuple[np.ndarray, int]:
    """Weighted probability sums over chunk ``(i, j)``'s extended window, and the number of tiles inferred.

    The sums are ``(n_classes + 1, core_h + 2*halo, core_w + 2*halo)`` float32: channel ``k < n_classes``
    holds ``sum(w * p_k)`` over the chunk's tiles and the last channel ``sum(w)``. A tile is inferred only
    when its core holds a valid pixel, a rule that does not depend on the chunking.
    """
    core = grid.chunk_window(i, j)
    h = grid.halo
    out_h, out_w = int(core.height) + 2 * h, int(core.width) + 2 * h
    acc = np.zeros((n_classes + 1, out_h, out_w), dtype=np.float32)
    if core_valid == 0:
        return acc, 0
    data, valid = read_extended(tiles_path, grid, core)
    # The tile grid is anchored at the scene origin, so the first tile core starts at the chunk core.
    # Mask out what lies beyond the scene: padding gives context but is never a pixel to predict.
    rows = np.arange(data.shape[1]) - h + int(core.row_off)
    cols = np.arange(data.shape[2]) - h + int(core.col_off)
    in_scene = ((rows >= 0) & (rows < grid.height))[:, None] & ((cols >= 0) & (cols < grid.width))[None, :]
    size, s = grid.size, grid.stride
    todo = [
        (r, c)
        for r, c in grid.tile_offsets(core)
        if (valid[r + h : r + h + s, c + h : c + h + s] & in_scene[r + h : r + h + s, c + h : c + h + s]).any()
    ]
    if not todo:
        return acc, 0
    predictor = get_predictor(key)
    x = predictor.normalize(data, valid)
    batch = np.stack([x[:, r : r + size, c : c + size] for r, c in todo])
    probs = predictor.predict(batch)
    weight = blend_weights(size, grid.overlap, blend)
    for (r, c), p in zip(todo, probs):
        # Tiles of the last partial chunk may reach past out_h/out_w: clip to the accumulator.
        hh, ww = min(size, out_h - r), min(size, out_w - c)
        if hh <= 0 or ww <= 0:
            continue
        acc[:n_classes, r : r + hh, c : c + ww] += p[:, :hh, :ww] * weight[:hh, :ww]
        acc[n_classes, r : r + hh, c : c + ww] += weight[:hh, :ww]
    return acc, len(todo)


def create_accumulator_store(path: str, grid: TileGrid, n_classes: int) -> None:
    """Empty store: ``core`` (classes + 1, H, W) plus the four halo strips of every chunk."""
    ny, nx = grid.chunks_shape
    c, h, k = grid.chunk, grid.halo, n_classes + 1
    group = zarr.open_group(path, mode="w")
    codecs = scratch_compressors()
    group.create_array("core", shape=(k, grid.height, grid.width), dtype="float32", chunks=(k, c, c), fill_value=0,
                       compressors=codecs)
    if h:
        for name in ("top", "bottom"):
            group.create_array(name, shape=(ny, nx, k, h, c + 2 * h), dtype="float32", chunks=(1, 1, k, h, c + 2 * h),
                               fill_value=0, compressors=codecs)
        for name in ("left", "right"):
            group.create_array(name, shape=(ny, nx, k, c, h), dtype="float32", chunks=(1, 1, k, c, h), fill_value=0,
                               compressors=codecs)


def store_accumulator(path: str, grid: TileGrid, i: int, j: int, ext: np.ndarray) -> None:
    """Write chunk ``(i, j)``'s extended accumulator: its core, and its halo as four strips."""
    group = zarr.open_group(path, mode="r+")
    core = grid.chunk_window(i, j)
    r0, c0, ch, cw = int(core.row_off), int(core.col_off), int(core.height), int(core.width)
    h = grid.halo
    group["core"][:, r0 : r0 + ch, c0 : c0 + cw] = ext[:, h : h + ch, h : h + cw]
    if h:
        group["top"][i, j, :, :, : cw + 2 * h] = ext[:, :h, :]
        group["bottom"][i, j, :, :, : cw + 2 * h] = ext[:, h + ch :, :]
        group["left"][i, j, :, :ch, :] = ext[:, h : h + ch, :h]
        group["right"][i, j, :, :ch, :] = ext[:, h : h + ch, h + cw :]


def infer_to_store(tiles_path: str, acc_path: str, grid: TileGrid, i: int, j: int, key: ModelKey, n_classes: int,
                   blend: str, core_valid: int, after: object = None) -> int:
    """Infer chunk ``(i, j)`` and store its accumulator; return the number of tiles inferred.

    ``after`` is unused: the neighbours' tile tasks passed there make a Dask graph wait for them.
    """
    ext, n_tiles = infer_chunk(tiles_path, grid, i, j, key, n_classes, blend, core_valid)
    store_accumulator(acc_path, grid, i, j, ext)
    return n_tiles


def model_key(checkpoint: Path, cfg: InferConfig, tasks_per_machine: int) -> ModelKey:
    """ModelKey for a run; CPU tasks share the cores (torch threads = cores / concurrent tasks)."""
    device, precision = resolve_device(cfg)
    threads = cfg.torch_threads
    if threads is None and device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // max(1, tasks_per_machine))
    return ModelKey(str(checkpoint), device, precision, cfg.channels_last, cfg.tta, cfg.batch_size, threads)

"""The predictor: a model on a device with its input normalisation, held by each worker, never by the graph.

A loaded model is identified by its checkpoint's digest, the device, the precision and the memory format
(:class:`ModelKey`); batch size, threads and test-time augmentation are per-call settings, so scenes with
other settings reuse the loaded model. :class:`ModelPlugin` loads it once when a worker starts (or joins
later); :func:`model_on_workers` registers the plugin for a run and removes it when the last run using
it ends, so a long-lived scheduler keeps no model of a finished run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from geoseg.device import reduced_dtype
from geoseg.errors import CheckpointError

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.models import ModelSpec

_MODELS: OrderedDict[ModelKey, Predictor] = OrderedDict()
_LOCK = threading.Lock()
#: Models kept per worker process (two scenes of a batch with different models run side by side).
_KEEP = 2


def _use_threads(threads: int | None) -> None:
    """Set the intra-op threads of the calling thread (OpenMP's count is per thread; the workers' slots share one)."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


#: Test-time augmentation: the views of a tile, each (quarter turns, mirror the columns first). 'flips' is
#: the tile, its two mirrors and their product (a half turn); 'd4' all eight symmetries of the square.
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "d4": tuple((k, m) for k in range(4) for m in (False, True)),
}


def _probabilities(forward: Callable[[Any], Any], x: Any, tta: str) -> Any:
    """Softmax class probabilities of the tiles ``x`` (N, bands, H, W), averaged over the views of ``tta``.

    Each view's probabilities are turned back onto the tile before they are averaged, so the average is
    per pixel of the tile, and the blending that follows sees one probability tile as without augmentation.
    """
    import torch

    views = TTA_VIEWS[tta]
    if len(views) > 4 and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"tta {tta!r} turns tiles a quarter turn and needs square tiles, not {tuple(x.shape[-2:])}")
    total = None
    for turns, mirror in views:
        v = x.flip(-1) if mirror else x
        v = torch.rot90(v, turns, (-2, -1)) if turns else v
        p = torch.softmax(forward(v).float(), dim=1)
        p = torch.rot90(p, -turns, (-2, -1)) if turns else p
        p = p.flip(-1) if mirror else p
        total = p if total is None else total + p
    assert total is not None  # every mode has a view
    return total / len(views) if len(views) > 1 else total


@dataclass(frozen=True)
class ModelKey:
    """What identifies a loaded model on a worker."""

    checkpoint: str
    digest: str
    """SHA-256 of the checkpoint file: a file replaced under the same name is another model."""
    device: str
    precision: str
    channels_last: bool

    @property
    def name(self) -> str:
        """Plugin name on the cluster."""
        fmt = "cl" if self.channels_last else "nchw"
        return f"geoseg-model-{self.digest[:16]}-{self.device}-{self.precision}-{fmt}"


class Predictor:
    """A model on a device with its input normalisation: numpy tiles in, class probabilities out."""

    def __init__(self, key: ModelKey) -> None:
        from geoseg._io import file_digest
        from geoseg.models import build_model, load_checkpoint

        if file_digest(Path(key.checkpoint)) != key.digest:
            raise CheckpointError(f"{key.checkpoint}: changed since the run started (another file under the same "
                                  "name); rerun to use the new model")
        spec, state = load_checkpoint(key.checkpoint)
        self._setup(build_model(spec, state), spec, key)

    def _setup(self, model: Any, spec: ModelSpec, key: ModelKey) -> None:
        import torch

        self.spec = spec
        self.key = key
        self.device = torch.device(key.device)
        self.dtype = reduced_dtype(key.precision)
        self.memory_format = torch.channels_last if key.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(spec.std, dtype=np.float32)[:, None, None]

    @classmethod
    def in_memory(cls, model: Any, spec: ModelSpec, device: str, precision: str, channels_last: bool) -> Predictor:
        """A predictor of a model held in memory (validation during training), used in eval mode.

        ``model`` is moved to the device and memory format in place: pass a copy of a model still training.
        """
        self = cls.__new__(cls)
        self._setup(model.eval(), spec, ModelKey("<memory>", "", device, precision, channels_last))
        return self

    @property
    def n_classes(self) -> int:
        """Output channels."""
        return len(self.spec.classes)

    def normalize(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Checkpoint normalisation; invalid pixels become 0 (the band mean)."""
        x = (data.astype(np.float32) - self.mean) / self.std
        x[:, ~valid] = 0.0
        return x

    def forward(self, x: Any) -> Any:
        """Logits of tiles already on the device, in the model's memory format and precision."""
        import torch

        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(x)

    def predict(self, tiles: np.ndarray, batch_size: int = 2, tta: str = "none",
                threads: int | None = None, done: Callable[[int], None] | None = None) -> np.ndarray:
        """Class probabilities (N, classes, H, W) float32 for normalised tiles (N, bands, H, W).

        ``tta``: a key of :data:`TTA_VIEWS`. ``threads``: intra-op threads (None: torch's own). ``done`` hears
        of each batch's tile count as it finishes.
        """
        import torch

        _use_threads(threads)
        out = np.empty((tiles.shape[0], self.n_classes, *tiles.shape[2:]), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(tiles), batch_size):
                x = torch.from_numpy(tiles[s : s + batch_size]).to(self.device, non_blocking=True)
                out[s : s + batch_size] = _probabilities(self.forward, x, tta).cpu().numpy()
                if done is not None:
                    done(len(x))
        return out


    def blend_on_device(self, data: np.ndarray, valid: np.ndarray, offsets: list[tuple[int, int]],
                        weights: list[np.ndarray], out: tuple[int, int, int, int], batch_size: int, tta: str,
                        threads: int | None = None, done: Callable[[int], None] | None = None) -> np.ndarray:
        """Weighted probability sums of tiles, computed where the model is (the GPU path; runs on CPU too).

        The raw extent ``data`` goes to the device once (from pinned memory, without blocking), is
        normalised there, cut into tiles at ``offsets`` (tile origins inside the extent), inferred in
        batches, and each tile's probabilities times its ``weights`` are added on the device into sums over
        ``out`` = (row, col, height, width) inside the extent; only the chunk's sums come back to the host.
        """
        import torch

        _use_threads(threads)
        dev = self.device
        pin = dev.type == "cuda"

        def upload(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return (t.pin_memory() if pin else t).to(dev, non_blocking=True)

        mean, std = upload(self.mean), upload(self.std)
        x = (upload(data).float() - mean) / std
        x = x * upload(valid)[None]  # invalid pixels become 0, the band mean
        o_r, o_c, o_h, o_w = out
        k = self.n_classes
        sums = torch.zeros((k + 1, o_h, o_w), device=dev)
        size = weights[0].shape[0]
        with torch.inference_mode():
            for s in range(0, len(offsets), batch_size):
                part = offsets[s : s + batch_size]
                tiles = torch.stack([x[:, r : r + size, c : c + size] for r, c in part])
                probs = _probabilities(self.forward, tiles, tta)
                for (r, c), p, w in zip(part, probs, weights[s : s + batch_size]):
                    r0, c0 = max(r, o_r), max(c, o_c)
                    r1, c1 = min(r + size, o_r + o_h), min(c + size, o_c + o_w)
                    if r0 >= r1 or c0 >= c1:
                        continue
                    ww = upload(w[r0 - r : r1 - r, c0 - c : c1 - c])
                    sums[:k, r0 - o_r : r1 - o_r, c0 - o_c : c1 - o_c] += p[:, r0 - r : r1 - r, c0 - c : c1 - c] * ww
                    sums[k, r0 - o_r : r1 - o_r, c0 - o_c : c1 - o_c] += ww
                if done is not None:
                    done(len(part))
        return sums.cpu().numpy()


def get_predictor(key: ModelKey) -> Predictor:
    """The worker's predictor for ``key``, loading it on first use (once per process)."""
    with _LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        predictor = Predictor(key)
        _MODELS[key] = predictor
        while len(_MODELS) > _KEEP:
            _MODELS.popitem(last=False)
        return predictor


def drop_predictor(key: ModelKey) -> None:
    """Free the worker's predictor for ``key`` (plugin teardown)."""
    with _LOCK:
        _MODELS.pop(key, None)


class ModelPlugin(WorkerPlugin):
    """Loads the model once when a worker starts (or joins later) and frees it at teardown."""

    idempotent = True

    def __init__(self, key: ModelKey) -> None:
        self.key = key
        self.name = key.name

    def setup(self, worker: Any) -> None:
        """Load the model on a worker."""
        get_predictor(self.key)

    def teardown(self, worker: Any) -> None:
        """Free the model: the worker closes or the plugin is removed."""
        drop_predictor(self.key)


_USERS: dict[tuple[int, str], int] = {}
_USERS_LOCK = threading.Lock()


@contextmanager
def model_on_workers(client: Client, key: ModelKey) -> Iterator[None]:
    """Register :class:`ModelPlugin` for ``key`` while the block runs; the last user removes it again.

    Scenes of a batch that share a model share one plugin: it is registered by the first and removed
    when the last one ends.
    """
    slot = (id(client), key.name)
    with _USERS_LOCK:
        first = _USERS.get(slot, 0) == 0
        _USERS[slot] = _USERS.get(slot, 0) + 1
    try:
        if first:
            client.register_plugin(ModelPlugin(key))
        yield
    finally:
        with _USERS_LOCK:
            _USERS[slot] -= 1
            last = _USERS[slot] == 0
            if last:
                del _USERS[slot]
        if last and client.status == "running":
            try:
                client.unregister_worker_plugin(key.name)
            except (OSError, ValueError, KeyError, TimeoutError):
                pass  # the cluster is going away with its workers

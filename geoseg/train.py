"""`geoseg train`: fit an smp model on scene/label rasters and write a self-describing checkpoint.

Random windows from the training area (never from the validation area), flips and 90-degree rotations,
cross-entropy with an ignore index, AdamW with a one-cycle schedule; validation mIoU after every epoch
decides which checkpoint is kept.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg import __version__
from geoseg._io import check_overwrite, file_digest
from geoseg.config import SceneConfig, TrainConfig, dump_config
from geoseg.errors import InputError
from geoseg.evaluate import confusion_matrix, iou_per_class, mean_iou
from geoseg.read import open_raster, read_window

log = logging.getLogger("geoseg")
IGNORE = 255


@dataclass
class _Region:
    """An image area in memory: raw bands, class-index targets (IGNORE where unknown) and its name."""

    image: np.ndarray
    target: np.ndarray
    name: str
    exclude: Window | None = None


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_miou: float
    history: list[dict] = field(default_factory=list)


def _label_lut(cfg: TrainConfig, max_code: int) -> np.ndarray:
    lut = np.full(max(max_code, 255) + 1, IGNORE, dtype=np.uint8)
    for index, c in enumerate(cfg.classes):
        for code in c.label_codes:
            if 0 <= code < len(lut):
                lut[code] = index
    return lut


def _load_scene(scene: SceneConfig, cfg: TrainConfig, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    bands = tuple(b.index for b in cfg.bands)
    with open_raster(scene.image) as img, open_raster(scene.labels) as lab:
        if (img.width, img.height) != (lab.width, lab.height) or img.transform != lab.transform:
            raise InputError(f"{scene.labels}: label grid differs from {scene.image.name} (shape or transform)")
        if max(bands) > img.count:
            raise InputError(f"{scene.image}: has {img.count} bands but bands[] asks for band {max(bands)}")
        data, valid = read_window(img, window, bands, None)
        labels = lab.read(1, window=window)
        label_valid = lab.read_masks(1, window=window) > 0
    if labels.dtype.kind not in "iu":
        raise InputError(f"{scene.labels}: labels must be integer class codes, not {labels.dtype}")
    lut = _label_lut(cfg, int(labels.max(initial=0)))
    target = lut[labels.astype(np.int64).clip(0, len(lut) - 1)]
    target[~(valid & label_valid)] = IGNORE
    return data.astype(np.float32), target


def _regions(cfg: TrainConfig) -> tuple[list[_Region], list[_Region]]:
    train, val = [], []
    vw = cfg.validation.window
    for scene in cfg.train:
        image, target = _load_scene(scene, cfg)
        exclude = None
        if vw is not None:
            exclude = Window(vw.col_off, vw.row_off, vw.width, vw.height)
            r0, c0 = vw.row_off, vw.col_off
            if r0 >= image.shape[1] or c0 >= image.shape[2]:
                raise InputError(f"{scene.image}: validation.window lies outside the scene")
            val.append(_Region(image[:, r0 : r0 + vw.height, c0 : c0 + vw.width],
                               target[r0 : r0 + vw.height, c0 : c0 + vw.width], f"{scene.image.name}:window"))
        train.append(_Region(image, target, scene.image.name, exclude))
    for scene in cfg.validation.scenes:
        image, target = _load_scene(scene, cfg)
        val.append(_Region(image, target, scene.image.name))
    return train, val


def _band_stats(regions: list[_Region]) -> tuple[list[float], list[float]]:
    """Per-band mean and std over valid training pixels (outside the validation window)."""
    n_bands = regions[0].image.shape[0]
    s = np.zeros(n_bands)
    ss = np.zeros(n_bands)
    n = 0
    for reg in regions:
        keep = reg.target != IGNORE
        if reg.exclude is not None:
            w = reg.exclude
            keep = keep.copy()
            keep[int(w.row_off) : int(w.row_off + w.height), int(w.col_off) : int(w.col_off + w.width)] = False
        px = reg.image[:, keep].astype(np.float64)
        s += px.sum(1)
        ss += (px**2).sum(1)
        n += px.shape[1]
    if n == 0:
        raise InputError("training scenes hold no valid labelled pixel")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0))
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def sample_windows(region: _Region, size: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random window origins in ``region`` that avoid its excluded (validation) window and hold labels."""
    _, h, w = region.image.shape
    if h < size or w < size:
        raise InputError(f"{region.name}: {h}x{w} is smaller than tile_size {size}")
    out: list[tuple[int, int]] = []
    ex = region.exclude
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > count * 200:
            raise InputError(f"{region.name}: cannot find {size}px training windows outside the validation area")
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if ex is not None and not (
            r + size <= ex.row_off or r >= ex.row_off + ex.height or c + size <= ex.col_off or c >= ex.col_off + ex.width
        ):
            continue
        if (region.target[r : r + size, c : c + size] != IGNORE).mean() < 0.5:
            continue
        out.append((r, c))
    return out


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(0, 4))
    x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
    if rng.random() < 0.5:
        x, y = x[:, :, ::-1], y[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def predict_region(model, x: np.ndarray, tile: int = 512) -> np.ndarray:  # noqa: ANN001
    """Class indexes for a normalised image (bands, H, W): reflect-padded tiles, centre crops kept."""
    import torch

    from geoseg.grid import pad_to

    _, h, w = x.shape
    halo = 32
    out = np.zeros((h, w), dtype=np.int64)
    core = tile - 2 * halo
    with torch.inference_mode():
        for r in range(0, h, core):
            for c in range(0, w, core):
                r0, c0 = r - halo, c - halo
                rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r0 + tile, h), min(c0 + tile, w)
                patch = pad_to(x[:, rr0:rr1, cc0:cc1], (rr0 - r0, cc0 - c0), (r0 + tile - rr1, c0 + tile - cc1))
                pred = model(torch.from_numpy(np.ascontiguousarray(patch))[None]).argmax(1)[0].numpy()
                hh, ww = min(core, h - r), min(core, w - c)
                out[r : r + hh, c : c + ww] = pred[halo : halo + hh, halo : halo + ww]
    return out


def train_model(cfg: TrainConfig, *, progress: bool = False) -> TrainResult:
    """Train, validate every epoch and keep the best checkpoint at ``cfg.output``."""
    import torch

    from geoseg.models import ModelSpec, create_model, save_checkpoint

    check_overwrite(cfg.output, cfg.overwrite)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    train, val = _regions(cfg)
    mean, std = _band_stats(train)
    m, s = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    norm = lambda img: (img - m) / s  # noqa: E731

    n_classes = len(cfg.classes)
    model = create_model(cfg.model.architecture, cfg.model.encoder, len(cfg.bands), n_classes, **cfg.model.arch_kwargs)
    spec = ModelSpec(
        architecture=cfg.model.architecture, encoder=cfg.model.encoder,
        bands=[{"index": b.index, "name": b.name} for b in cfg.bands], mean=mean, std=std,
        classes=[{"id": c.id, "name": c.name, "color": c.color if isinstance(c.color, str) else
                  "#{:02x}{:02x}{:02x}".format(*c.color)} for c in cfg.classes],
        tile_size=cfg.tile_size, arch_kwargs=dict(cfg.model.arch_kwargs),
    )
    if cfg.tile_size % spec.output_stride:
        from geoseg.errors import ConfigError

        raise ConfigError(f"tile_size: {cfg.tile_size} is not divisible by the model's output stride {spec.output_stride}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch,
                                                pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    val_norm = [(norm(r.image), r.target) for r in val]
    history: list[dict] = []
    best = (-1.0, 0)
    log_path = cfg.output.with_suffix(".log.csv")
    bar = _bar(cfg.epochs * cfg.steps_per_epoch, progress)
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        for _ in range(cfg.steps_per_epoch):
            xs, ys = [], []
            for _ in range(cfg.batch_size):
                reg = train[int(rng.integers(0, len(train)))]
                (r, c), = sample_windows(reg, cfg.tile_size, 1, rng)
                x = norm(reg.image[:, r : r + cfg.tile_size, c : c + cfg.tile_size])
                x[:, reg.target[r : r + cfg.tile_size, c : c + cfg.tile_size] == IGNORE] = 0
                x, y = _augment(x, reg.target[r : r + cfg.tile_size, c : c + cfg.tile_size], rng)
                xs.append(x)
                ys.append(y.astype(np.int64))
            xb, yb = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar:
                bar.advance(bar.task_ids[0])
        model.eval()
        cm = np.zeros((n_classes, n_classes), dtype=np.int64)
        for x, target in val_norm:
            pred = predict_region(model, x)
            cm += confusion_matrix(target, pred, n_classes)
        iou = iou_per_class(cm)
        miou = mean_iou(cm)
        row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "val_miou": round(miou, 5),
               "lr": sched.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - started, 1)}
        row.update({f"iou_{c.name}": (None if np.isnan(v) else round(float(v), 5)) for c, v in zip(cfg.classes, iou)})
        history.append(row)
        log.info("epoch %d  loss %.4f  val mIoU %.4f", epoch, row["train_loss"], miou)
        if miou > best[0]:
            best = (miou, epoch)
            provenance = {
                "geoseg_version": __version__, "trained": datetime.now(timezone.utc).isoformat(),
                "epoch": epoch, "val_miou": miou, "val_iou": row, "seed": cfg.seed,
                "data": [{"image": str(sc.image), "labels": str(sc.labels), "sha256": file_digest(sc.image)[:16]}
                         for sc in cfg.train],
                "config": dump_config(cfg),
            }
            save_checkpoint(cfg.output, model, ModelSpec(**{**spec.__dict__, "provenance": provenance}))
        _write_log(log_path, history)
    if bar:
        bar.stop()
    return TrainResult(cfg.output, best[1], best[0], history)


def _write_log(path: Path, history: list[dict]) -> None:
    from geoseg._io import atomic_path

    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    bar.start()
    bar.add_task("train", total=total)
    return bar

"""Training data: labelled regions in memory, band statistics, window sampling and augmentation.

A *region* is one training or validation image with its class-index targets (``IGNORE`` where a pixel is
nodata, unlabelled or an ignored code). Training windows are drawn from the training regions and never
intersect a region's validation window, so no validation pixel is ever trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rasterio.windows import Window, intersect

from geoseg.config import AugmentConfig, SceneConfig, TrainConfig, WindowConfig
from geoseg.errors import InputError
from geoseg.read import open_raster, read_window

IGNORE = 255
"""Target value of pixels that take no part in the loss or the metrics."""


@dataclass
class Region:
    """An image area in memory: raw bands ``(bands, H, W)`` float32, targets ``(H, W)`` uint8 and its name."""

    image: np.ndarray
    target: np.ndarray
    name: str
    exclude: Window | None = None
    """Validation window inside this region: no training window may intersect it."""
    valid: np.ndarray | None = None
    """Image pixels that are not nodata ``(H, W)`` (None: all): validation predicts as ``geoseg run`` does."""
    _trainable: np.ndarray | None = field(default=None, repr=False)

    @property
    def trainable(self) -> np.ndarray:
        """Pixels a training window may learn from: labelled and outside the excluded window."""
        if self._trainable is None:
            keep = self.target != IGNORE
            if self.exclude is not None:
                w = self.exclude
                keep[int(w.row_off) : int(w.row_off + w.height), int(w.col_off) : int(w.col_off + w.width)] = False
            self._trainable = keep
        return self._trainable

    def overlaps_exclude(self, r: int, c: int, size: int) -> bool:
        """Whether the window of ``size`` pixels at ``(r, c)`` shares a pixel with the validation window."""
        return self.exclude is not None and intersect(Window(c, r, size, size), self.exclude)


def label_lut(cfg: TrainConfig, max_code: int) -> np.ndarray:
    """Lookup label code -> class index (IGNORE for ignored and unmapped codes)."""
    lut = np.full(max(max_code, 255) + 1, IGNORE, dtype=np.uint8)
    for index, c in enumerate(cfg.classes):
        for code in c.label_codes:
            if 0 <= code < len(lut):
                lut[code] = index
    return lut


def load_scene(scene: SceneConfig, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bands (float32), class-index targets and the image's valid mask; nodata in either raster is IGNORE."""
    bands = tuple(b.index for b in cfg.bands)
    with open_raster(scene.image) as img, open_raster(scene.labels) as lab:
        if (img.width, img.height) != (lab.width, lab.height) or img.transform != lab.transform:
            raise InputError(f"{scene.labels}: label grid differs from {scene.image.name} (shape or transform)")
        if max(bands) > img.count:
            raise InputError(f"{scene.image}: has {img.count} bands but bands[] asks for band {max(bands)}")
        data, valid = read_window(img, None, bands, None)
        labels = lab.read(1)
        label_valid = lab.read_masks(1) > 0
    if labels.dtype.kind not in "iu":
        raise InputError(f"{scene.labels}: labels must be integer class codes, not {labels.dtype}")
    lut = label_lut(cfg, int(labels.max(initial=0)))
    target = lut[labels.astype(np.int64).clip(0, len(lut) - 1)]
    target[~(valid & label_valid)] = IGNORE
    return data.astype(np.float32), target, valid


def resolve_window(w: WindowConfig, height: int, width: int, source: str) -> Window:
    """The validation window on a ``height`` x ``width`` scene (missing sizes run to the edge)."""
    if w.row_off >= height or w.col_off >= width:
        raise InputError(f"{source}: validation.window starts outside the {height} x {width} scene")
    h = min(w.height or height - w.row_off, height - w.row_off)
    wd = min(w.width or width - w.col_off, width - w.col_off)
    return Window(w.col_off, w.row_off, wd, h)


def load_regions(cfg: TrainConfig, *, holdout: bool = True) -> tuple[list[Region], list[Region]]:
    """Training regions (each with its validation window excluded) and validation regions.

    ``holdout=False`` (a refit on all labelled data): the validation windows are trainable and the
    validation scenes are training regions too; the validation regions are returned as well.
    """
    train, val = [], []
    for scene in cfg.train:
        image, target, valid = load_scene(scene, cfg)
        exclude = None
        if cfg.validation.window is not None:
            exclude = resolve_window(cfg.validation.window, image.shape[1], image.shape[2], str(scene.image))
            rows, cols = exclude.toslices()
            val.append(Region(image[:, rows, cols], target[rows, cols], f"{scene.image.name}:window",
                              valid=valid[rows, cols]))
        train.append(Region(image, target, scene.image.name, exclude if holdout else None, valid=valid))
    for scene in cfg.validation.scenes:
        image, target, valid = load_scene(scene, cfg)
        val.append(Region(image, target, scene.image.name, valid=valid))
        if not holdout:
            train.append(val[-1])
    if not any(r.trainable.any() for r in train):
        raise InputError("training scenes hold no labelled pixel outside the validation window")
    return train, val


def band_stats(regions: list[Region]) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation over the trainable pixels (never validation pixels)."""
    n_bands = regions[0].image.shape[0]
    s, ss, n = np.zeros(n_bands), np.zeros(n_bands), 0
    for reg in regions:
        px = reg.image[:, reg.trainable].astype(np.float64)
        s += px.sum(1)
        ss += (px**2).sum(1)
        n += px.shape[1]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0))
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def normaliser(mean: list[float], std: list[float]) -> Callable[[np.ndarray], np.ndarray]:
    """``(image - mean) / std`` per band of a ``(bands, H, W)`` array, in float32."""
    m, s = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    return lambda image: (image - m) / s


def class_counts(regions: list[Region], n_classes: int) -> np.ndarray:
    """Trainable pixels per class index."""
    return sum((np.bincount(r.target[r.trainable], minlength=n_classes)[:n_classes] for r in regions),
               np.zeros(n_classes, dtype=np.int64))


class WindowSampler:
    """Draws training windows ``(region, row, col, side)``: uniformly, or centred near a rare-class pixel.

    Windows lie inside their region, hold at least ``min_labelled`` trainable pixels and never intersect the
    region's validation window. With ``class_balanced`` a class is drawn uniformly from the classes present,
    then one of its pixels, then a window that contains it.
    """

    def __init__(self, regions: list[Region], n_classes: int, rng: np.random.Generator, *,
                 class_balanced: bool = False, min_labelled: float = 0.5, max_points: int = 200_000) -> None:
        self.regions, self.rng, self.min_labelled = regions, rng, min_labelled
        sizes = np.array([r.trainable.sum() for r in regions], dtype=np.float64)
        if not sizes.sum():
            raise InputError("no labelled pixel to train on outside the validation area")
        self.region_p = sizes / sizes.sum()
        self.points: list[np.ndarray] = []
        if class_balanced:
            # (region, row, col) of every trainable pixel per class; subsampled so huge scenes stay cheap.
            for k in range(n_classes):
                parts = [np.column_stack([np.full(len(rr), i), rr, cc])
                         for i, reg in enumerate(regions) for rr, cc in [np.nonzero(reg.trainable & (reg.target == k))]]
                pts = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
                if len(pts) > max_points:
                    pts = pts[rng.choice(len(pts), max_points, replace=False)]
                if len(pts):
                    self.points.append(pts)

    def sample(self, side: int) -> tuple[Region, int, int]:
        """One window of ``side`` pixels: ``(region, row_off, col_off)``."""
        for _ in range(1000):
            if self.points:
                pts = self.points[int(self.rng.integers(0, len(self.points)))]
                i, pr, pc = pts[int(self.rng.integers(0, len(pts)))]
                reg = self.regions[int(i)]
                _, h, w = reg.image.shape
                if h < side or w < side:
                    continue
                r = int(np.clip(pr - self.rng.integers(0, side), 0, h - side))
                c = int(np.clip(pc - self.rng.integers(0, side), 0, w - side))
            else:
                reg = self.regions[int(self.rng.choice(len(self.regions), p=self.region_p))]
                _, h, w = reg.image.shape
                if h < side or w < side:
                    continue
                r, c = int(self.rng.integers(0, h - side + 1)), int(self.rng.integers(0, w - side + 1))
            if reg.overlaps_exclude(r, c, side):
                continue
            if reg.trainable[r : r + side, c : c + side].mean() >= self.min_labelled:
                return reg, r, c
        sizes = ", ".join(f"{r.name} {r.image.shape[1]}x{r.image.shape[2]}" for r in self.regions)
        raise InputError(f"cannot find {side}px training windows with {self.min_labelled:.0%} labelled pixels outside "
                         f"the validation area ({sizes}); use a smaller tile_size or sampling.min_labelled")


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random dihedral transform and per-band brightness/contrast jitter of a normalised window."""
    if cfg.rotate90:
        k = int(rng.integers(0, 4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
    if cfg.flips:
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[:, ::-1, :], y[::-1, :]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if cfg.contrast or cfg.brightness:
        n = x.shape[0]
        gain = 1.0 + np.asarray(rng.uniform(-cfg.contrast, cfg.contrast, n), dtype=np.float32)
        shift = np.asarray(rng.uniform(-cfg.brightness, cfg.brightness, n), dtype=np.float32)
        x = x * gain[:, None, None] + shift[:, None, None]
    return x, np.ascontiguousarray(y)


def scale_side(side: int, scale: float, rng: np.random.Generator) -> int:
    """Side of the source window for scale jitter: ``side / f`` for a zoom factor f in [1 - scale, 1 + scale]."""
    if not scale:
        return side
    return max(2, int(round(side / rng.uniform(1.0 - scale, 1.0 + scale))))


def resample(x: np.ndarray, y: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a window to ``side`` x ``side``: bilinear bands (antialiased when shrinking), nearest labels."""
    import torch
    import torch.nn.functional as F

    if x.shape[-1] == side:
        return x, y
    xt = torch.from_numpy(np.ascontiguousarray(x))[None]
    shrink = x.shape[-1] > side
    xs = F.interpolate(xt, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)[0].numpy()
    yt = torch.from_numpy(np.ascontiguousarray(y))[None, None].float()
    ys = F.interpolate(yt, size=(side, side), mode="nearest")[0, 0].numpy().astype(np.uint8)
    return xs, ys

"""Domain guard: is the input like the data the model was trained on?

A model fed data unlike its training data still gives a confident map (the demo model labels an 8-bit
Landsat scene "water" at 0.9 confidence). Before tiling, :func:`check_domain` reads a sample of windows
spread over the scene and compares their per-band statistics with the checkpoint's: the training mean and
standard deviation of every band (every checkpoint has them) and, for checkpoints written since, the
training data's dtype and value range (:func:`training_data_stats`, in the header's provenance). It says
what is far apart: another dtype, values 10x larger or smaller, a band whose mean is many training
standard deviations away, or bands picked by index from a raster with more of them and no name to
confirm the pick. ``geoseg run`` warns once with the numbers and records the report in ``run.json`` and
the STAC Item; ``read.strict: true`` refuses instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

if TYPE_CHECKING:
    import rasterio

    from geoseg.models import ModelSpec
    from geoseg.read import Raster
    from geoseg.training_data import Region

#: A band whose sampled mean lies more than this many training standard deviations from the training mean.
Z_LIMIT = 4.0
#: Values this many times larger (or smaller) than the training data's: another scaling (8-bit, reflectance 0-1).
SCALE_LIMIT = 10.0
#: Windows sampled per side of the scene, and their side in pixels.
GRID, SIDE = 4, 256


@dataclass(frozen=True)
class DomainReport:
    """What the guard found: the input's sampled statistics and the warnings (empty when it looks alike)."""

    warnings: tuple[str, ...]
    stats: dict[str, Any]

    @property
    def ok(self) -> bool:
        """No warning."""
        return not self.warnings

    def to_dict(self) -> dict[str, Any]:
        """The record in ``run.json``."""
        return {"ok": self.ok, "warnings": list(self.warnings), "input": self.stats}


def training_data_stats(regions: list[Region], dtype: str) -> dict[str, Any]:
    """The training data's dtype and per-band value range, for a checkpoint's provenance."""
    lo = np.full(regions[0].image.shape[0], np.inf)
    hi = np.full(regions[0].image.shape[0], -np.inf)
    for reg in regions:
        px = reg.image[:, reg.trainable]
        if px.size:
            lo, hi = np.minimum(lo, px.min(1)), np.maximum(hi, px.max(1))
    return {"dtype": dtype, "min": [float(v) for v in lo], "max": [float(v) for v in hi]}


def sample_windows(height: int, width: int, per_side: int = GRID, side: int = SIDE) -> list[Window]:
    """``per_side`` x ``per_side`` windows of ``side`` pixels spread evenly over the scene (fewer if it is small)."""
    def starts(length: int) -> list[int]:
        size = min(side, length)
        n = max(1, min(per_side, length // size))
        return sorted({round(k * (length - size) / max(n - 1, 1)) for k in range(n)})

    h, w = min(side, height), min(side, width)
    return [Window(c, r, w, h) for r in starts(height) for c in starts(width)]


def input_stats(raster: Raster, src: rasterio.DatasetReader) -> dict[str, Any]:
    """Per-band mean, standard deviation, min and max of the valid pixels of :func:`sample_windows`."""
    from rasterio.errors import RasterioError

    from geoseg.read import unreadable

    chunks = []
    for window in sample_windows(raster.height, raster.width):
        try:
            data, valid = raster.read(src, window)
        except RasterioError as exc:
            raise unreadable(raster.path, window, exc) from None
        chunks.append(data[:, valid].astype(np.float64))
    px = np.concatenate(chunks, axis=1) if chunks else np.zeros((len(raster.bands), 0))
    out: dict[str, Any] = {"dtype": raster.store_dtype, "pixels": int(px.shape[1])}
    if px.shape[1]:
        out.update(mean=[round(float(v), 4) for v in px.mean(1)], std=[round(float(v), 4) for v in px.std(1)],
                   min=[float(v) for v in px.min(1)], max=[float(v) for v in px.max(1)])
    return out


def compare(stats: dict[str, Any], spec: ModelSpec, *, count: int, explicit_bands: bool,
            band_names: tuple[str | None, ...] = ()) -> tuple[str, ...]:
    """The ways the input's ``stats`` are far from the checkpoint's training data, one phrase each."""
    found: list[str] = []
    trained = spec.provenance.get("training_data") or {}
    if trained.get("dtype") and trained["dtype"] != stats["dtype"]:
        found.append(f"data type {stats['dtype']}, trained on {trained['dtype']}")
    names = spec.band_names
    if count > spec.in_channels and not explicit_bands:
        confirmed = [str(n).lower() for n in band_names] == [n.lower() for n in names]
        if not confirmed:
            found.append(f"the raster has {count} bands and the model's {spec.in_channels} were picked by index "
                         f"with no band names to confirm them (set read.bands to choose)")
    if "mean" in stats:
        scaled, shifted = [], []
        for k, name in enumerate(names):
            mean, t_mean, t_std = stats["mean"][k], spec.mean[k], spec.std[k]
            ratio = abs(mean) / abs(t_mean) if t_mean else np.inf
            if t_mean and abs(mean) > 0 and (ratio >= SCALE_LIMIT or ratio <= 1 / SCALE_LIMIT):
                scaled.append(f"{name} {mean:.4g} vs {t_mean:.4g}")
            elif abs(mean - t_mean) / t_std > Z_LIMIT:
                shifted.append(f"{name} {mean:.4g} is {abs(mean - t_mean) / t_std:.1f} sd from {t_mean:.4g}")
        if scaled:
            found.append(f"values on another scale (10x or more): band means {', '.join(scaled)} in training")
        if shifted:
            found.append(f"band means far from training: {', '.join(shifted)} (limit {Z_LIMIT:g} sd)")
    return tuple(found)


def check_domain(raster: Raster, spec: ModelSpec, src: rasterio.DatasetReader, *,
                 explicit_bands: bool) -> DomainReport:
    """Compare a sample of ``raster`` (open as ``src``) with the data ``spec``'s model was trained on."""
    stats = input_stats(raster, src)
    return DomainReport(compare(stats, spec, count=raster.count, explicit_bands=explicit_bands,
                                band_names=raster.band_names), stats)

"""`geoseg pretrain`: make an encoder from unlabelled scenes by masked-image modelling.

Nothing can be downloaded, so geoseg makes its own starting point. Windows drawn from the scenes have half
of their 8 px patches (``mask``) set to the band mean; the network the user will fine-tune, with one output
per band instead of per class, learns to fill them in, and the L1 error on the masked, valid pixels of the
normalised bands is the loss (SimMIM, Xie et al. 2022, with a convolutional encoder). Only the encoder is
written: an smp encoder state dict that ``model.encoder_weights`` loads, with the run's record in the
safetensors metadata. Why this objective rather than a contrastive one: docs/training.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from geoseg._io import atomic_path, check_overwrite, file_digest
from geoseg._version import __version__
from geoseg.config import AugmentConfig, PretrainConfig, dump_config
from geoseg.device import autocast
from geoseg.errors import InputError
from geoseg.read import open_raster, read_window
from geoseg.train import optimiser_step, start_run
from geoseg.training_data import IGNORE, Region, WindowSampler, augment, band_stats, normaliser, resolve_window

log = logging.getLogger("geoseg")

#: Key of the run's record in the encoder file's safetensors metadata.
METADATA_KEY = "geoseg_pretrain"
#: Windows of the fixed probe batch on which each epoch's reconstruction error is reported.
PROBE_WINDOWS = 64
#: Gradient-norm clipping of every step (geoseg train's default).
GRAD_CLIP = 5.0
_FLIPS = AugmentConfig(flips=True, rotate90=True)


@dataclass
class PretrainResult:
    """What a pretraining run produced: the encoder file and the probe's error per epoch."""

    encoder: Path
    history: list[dict] = field(default_factory=list)
    baseline_error: float = 0.0
    """Probe error of filling every masked pixel with the band mean (what an untrained network does at best)."""


def load_unlabelled(cfg: PretrainConfig) -> list[Region]:
    """The scenes' bands (float32) as regions whose every valid pixel may be sampled (nodata is IGNORE)."""
    bands = tuple(b.index for b in cfg.bands)
    regions = []
    for scene in cfg.scenes:
        with open_raster(scene.image) as src:
            if max(bands) > src.count:
                raise InputError(f"{scene.image}: has {src.count} bands but bands[] asks for band {max(bands)}")
            window = None
            if scene.window is not None:
                window = resolve_window(scene.window, src.height, src.width, str(scene.image))
            data, valid = read_window(src, window, bands, None)
        target = np.where(valid, 0, IGNORE).astype(np.uint8)
        regions.append(Region(data.astype(np.float32), target, scene.image.name))
    if not any(r.trainable.any() for r in regions):
        raise InputError(f"{cfg.scenes[0].image}: the scenes hold no valid pixel to pretrain on")
    return regions


def patch_mask(n: int, side: int, patch: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``(n, side, side)`` booleans: True on a random ``ratio`` of the ``patch``-pixel squares of each window."""
    cells = -(-side // patch)
    k = max(1, int(round(ratio * cells * cells)))
    grid = np.zeros((n, cells * cells), dtype=bool)
    for i in range(n):
        grid[i, rng.choice(cells * cells, k, replace=False)] = True
    squares = grid.reshape(n, cells, cells)
    return squares.repeat(patch, 1).repeat(patch, 2)[:, :side, :side]


def _windows(sampler: WindowSampler, n: int, side: int, norm, rng: np.random.Generator):  # noqa: ANN001, ANN202
    """``n`` normalised, augmented windows and their validity, as numpy arrays."""
    xs, vs = [], []
    for _ in range(n):
        reg, r, c = sampler.sample(side)
        valid = reg.target[r : r + side, c : c + side] != IGNORE
        x = norm(reg.image[:, r : r + side, c : c + side])
        x[:, ~valid] = 0.0
        x, v = augment(x, valid.astype(np.uint8), rng, _FLIPS)
        xs.append(x)
        vs.append(v.astype(bool))
    return np.stack(xs), np.stack(vs)


def masked_l1(pred: Any, x: Any, weight: Any) -> Any:
    """Mean absolute error over the pixels (and all bands) where ``weight`` (N, H, W) is True."""
    w = weight[:, None].to(pred.dtype)
    return ((pred - x).abs() * w).sum() / (w.sum() * x.shape[1]).clamp_min(1)


def pretrain_encoder(cfg: PretrainConfig, *, progress: bool = False) -> PretrainResult:
    """Pretrain ``cfg.model``'s encoder on ``cfg.scenes`` and write it to ``cfg.output``."""
    import torch
    from safetensors.torch import save_file

    from geoseg.models import create_model
    from geoseg.progress import progress_bar

    check_overwrite(cfg.output, cfg.overwrite)
    device, precision, rng = start_run(cfg.device, cfg.precision, cfg.seed, cfg.threads)

    regions = load_unlabelled(cfg)
    mean, std = band_stats(regions)
    norm = normaliser(mean, std)
    n_bands = len(cfg.bands)
    model = create_model(cfg.model.architecture, cfg.model.encoder, n_bands, n_bands, **cfg.model.arch_kwargs)
    origin: dict[str, Any] = {}
    if cfg.model.encoder_weights is not None:  # pretraining further from an encoder the user has
        from geoseg.transfer import load_encoder_weights

        origin["encoder_weights"] = load_encoder_weights(model, cfg.model.encoder_weights).describe()
    model = model.to(device)
    sampler = WindowSampler(regions, 1, rng, min_labelled=cfg.min_valid)
    side, patch, ratio = cfg.tile_size, cfg.mask.patch, cfg.mask.ratio
    probe_x, probe_v = _windows(sampler, PROBE_WINDOWS, side, norm, rng)
    probe_m = patch_mask(PROBE_WINDOWS, side, patch, ratio, rng) & probe_v
    px, pm = torch.from_numpy(probe_x).to(device), torch.from_numpy(probe_m).to(device)
    baseline = float(masked_l1(torch.zeros_like(px), px, pm))

    def probe() -> float:
        model.eval()
        with torch.inference_mode(), autocast(device, precision):
            err = float(masked_l1(model(px * ~pm[:, None]).float(), px, pm))
        model.train()
        return err

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch,
                                                pct_start=0.15)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    history: list[dict[str, Any]] = [{"epoch": 0, "train_loss": None, "probe_l1": round(probe(), 5), "elapsed_s": 0.0}]
    log.info("pretraining %s/%s on %d scenes: %d epochs of %d steps x %d windows of %d px, %.0f%% of %d px "
             "patches masked, on %s (%s); probe L1 %.4f (band means: %.4f)", cfg.model.architecture,
             cfg.model.encoder, len(regions), cfg.epochs, cfg.steps_per_epoch, cfg.batch_size, side, ratio * 100,
             patch, device, precision, history[0]["probe_l1"], baseline)
    bar = progress_bar(cfg.epochs * cfg.steps_per_epoch, "pretraining", progress)
    started = time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        losses = []
        for _ in range(cfg.steps_per_epoch):
            xb, vb = _windows(sampler, cfg.batch_size, side, norm, rng)
            mb = patch_mask(cfg.batch_size, side, patch, ratio, rng) & vb
            x, mk = torch.from_numpy(xb).to(device), torch.from_numpy(mb).to(device)
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = masked_l1(model(x * ~mk[:, None]).float(), x, mk)
            losses.append(optimiser_step(loss, model, opt, sched, scaler, GRAD_CLIP))
            if bar:
                bar.advance(bar.task_ids[0])
        row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "probe_l1": round(probe(), 5),
               "elapsed_s": round(time.perf_counter() - started, 1)}
        history.append(row)
        log.info("epoch %d  loss %.4f  probe L1 %.4f", epoch, row["train_loss"], row["probe_l1"])
    if bar:
        bar.stop()

    record = {
        "geoseg_version": __version__, "trained": datetime.now(timezone.utc).isoformat(),
        "objective": "masked-image modelling (L1 on masked pixels of the normalised bands)",
        "architecture": cfg.model.architecture, "encoder": cfg.model.encoder,
        "bands": [{"index": b.index, "name": b.name} for b in cfg.bands], "mean": mean, "std": std,
        "data": [{"image": str(sc.image), "sha256": file_digest(sc.image)[:16],
                  "window": sc.window.model_dump() if sc.window else None} for sc in cfg.scenes],
        "probe_l1": [h["probe_l1"] for h in history], "baseline_l1": round(baseline, 5),
        "config": dump_config(cfg), **origin,
    }
    encoder: Any = model.encoder
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(cfg.output, cfg.overwrite) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(record, default=str)})
    return PretrainResult(cfg.output, history, baseline)


def read_record(path: str | Path) -> dict | None:
    """The pretraining record of an encoder file ``geoseg pretrain`` wrote, else None."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None

"""`geoseg train`: fit an smp model on scene/label rasters and write a self-describing checkpoint.

Windows are drawn from the training area only (:mod:`geoseg.training_data`), augmented, and fed to AdamW
under a one-cycle or cosine schedule with the configured loss (:mod:`geoseg.losses`). After every epoch the
model predicts the held-out validation area through the pipeline's own predictor, tiling and blending, and is
scored with the evaluation stage's own metrics; ``selection`` says which weights are the checkpoint (the best
epoch, the last, an SWA or EMA average), and ``refit`` retrains on all labelled pixels for the chosen epochs.
Every epoch also writes the log (CSV), the curves (PNG) and a training state from which ``--resume``
continues exactly where the run stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from geoseg._io import atomic_path, check_overwrite, file_digest
from geoseg._version import __version__
from geoseg.config import SegmentConfig, TrainConfig, dump_config
from geoseg.device import autocast, resolve_device
from geoseg.errors import CheckpointError, ConfigError, InputError
from geoseg.evaluate import Metrics, confusion_matrix
from geoseg.models import ModelSpec
from geoseg.training_data import (
    IGNORE,
    Region,
    WindowSampler,
    augment,
    band_stats,
    class_counts,
    load_regions,
    normaliser,
    resample,
    scale_side,
)

log = logging.getLogger("geoseg")

#: Seconds between the lines a training epoch writes when not on a terminal.
HEARTBEAT_S = 30.0

#: What a training state must share with the config it resumes under.
_STATE_KEYS = ("model", "bands", "classes", "ignore_codes", "train", "validation", "tile_size", "batch_size",
               "steps_per_epoch", "loss", "sampling", "augment", "seed", "selection", "swa_epochs", "ema_decay")


@dataclass(frozen=True)
class TrainPaths:
    """Files a training run writes beside its checkpoint."""

    checkpoint: Path
    log: Path
    curves: Path
    state: Path

    @classmethod
    def for_output(cls, output: Path) -> TrainPaths:
        """The files beside checkpoint ``output``."""
        return cls(output, output.with_suffix(".log.csv"), output.with_suffix(".curves.png"),
                   output.with_suffix(".train-state.pt"))


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    best_epoch: int
    best_miou: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    selection: str = "best"
    selected_miou: float | None = None
    """Validation mIoU of the weights kept (None after a refit: the validation area was trained on)."""


def predict_region(model: Any, region: Region, spec: ModelSpec, tiling: SegmentConfig, *, device: str = "cpu",
                   precision: str = "fp32", threads: int | None = None) -> np.ndarray:
    """Class indexes of a region's raw bands, normalised, tiled, inferred and blended as ``geoseg run`` does.

    One code path with the pipeline: the checkpoint normalisation and nodata rule of its predictor, its
    batches, memory format and test-time augmentation (``tiling.infer``; device and precision are the
    arguments), and its tiling and blending (``tiling.tile``, ``tiling.stitch``). ``model`` is copied, so a
    model still training keeps its mode and memory format. Image nodata gets -1.
    """
    import copy

    from geoseg.segment import predict_array
    from geoseg.segment.predict import Predictor

    infer = tiling.infer
    channels_last = True if infer.channels_last is None else infer.channels_last
    predictor = Predictor.in_memory(copy.deepcopy(model), spec, device, precision, channels_last)
    valid = np.ones(region.image.shape[1:], dtype=bool) if region.valid is None else region.valid
    x = predictor.normalize(region.image, valid)
    return predict_array(lambda b: predictor.predict(b, infer.batch_size, infer.tta, threads), x, valid, spec, tiling)


def start_run(device: str, precision: str, seed: int, threads: int | None, *,
              cpu_bf16: bool = False) -> tuple[str, str, np.random.Generator]:
    """Device and precision resolved, torch seeded and deterministic, the run's numpy generator.

    What every training run (``geoseg train``, ``geoseg pretrain``) does first, so the same seed gives the
    same weights on CPU. ``cpu_bf16``: ``auto`` on the CPU is bf16 where the CPU computes it natively.
    """
    import torch

    from geoseg.device import cpu_has_bf16

    auto = precision == "auto"
    device, precision = resolve_device(device, precision)
    if auto and cpu_bf16 and device == "cpu" and cpu_has_bf16():
        precision = "bf16"
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device, precision, np.random.default_rng(seed)


def optimiser_step(loss: Any, model: Any, opt: Any, sched: Any, scaler: Any, grad_clip: float) -> float:
    """Backpropagate ``loss`` (scaled for fp16), clip the gradient norm to ``grad_clip`` (0: not), step."""
    import torch

    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    return float(loss.item())


def _batch(sampler: WindowSampler, cfg: TrainConfig, norm, rng: np.random.Generator):  # noqa: ANN001, ANN202
    """One training batch ``(x, y)`` as numpy arrays: sampled, normalised, resampled and augmented windows."""
    size = cfg.tile_size
    xs, ys = [], []
    for _ in range(cfg.batch_size):
        side = scale_side(size, cfg.augment.scale, rng)
        reg, r, c = sampler.sample(side)
        y = reg.target[r : r + side, c : c + side]
        x = norm(reg.image[:, r : r + side, c : c + side])
        x[:, y == IGNORE] = 0.0  # unlabelled pixels look like the band mean, as nodata does at inference
        x, y = resample(x, y, size)
        x, y = augment(x, y, rng, cfg.augment)
        xs.append(x)
        ys.append(y.astype(np.int64))
    return np.stack(xs), np.stack(ys)


def _param_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group, or the encoder's at ``encoder_lr_factor`` of the learning rate and the rest's."""
    if cfg.encoder_lr_factor == 1:
        return [{"params": list(model.parameters()), "lr": cfg.lr}]
    encoder = {id(p) for p in model.encoder.parameters()}
    return [{"params": list(model.encoder.parameters()), "lr": cfg.lr * cfg.encoder_lr_factor},
            {"params": [p for p in model.parameters() if id(p) not in encoder], "lr": cfg.lr}]


def _schedule(opt, cfg: TrainConfig):  # noqa: ANN001, ANN202
    import torch

    total = cfg.epochs * cfg.steps_per_epoch
    peaks = [g["lr"] for g in opt.param_groups]
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.lr * 0.01)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks if len(peaks) > 1 else cfg.lr, total_steps=total,
                                               pct_start=0.15)


def _check_init(cfg: TrainConfig) -> None:
    """``cfg.init`` is a checkpoint of the network ``cfg.model`` builds, else a one-line error saying what it is."""
    from geoseg.models import read_model_spec

    assert cfg.init is not None
    spec = read_model_spec(cfg.init)
    if (spec.architecture, spec.encoder, spec.arch_kwargs) != (cfg.model.architecture, cfg.model.encoder,
                                                               dict(cfg.model.arch_kwargs)):
        raise ConfigError(f"init: {cfg.init} is a {spec.architecture}/{spec.encoder} model with arch_kwargs "
                          f"{spec.arch_kwargs}; set model.architecture, model.encoder and model.arch_kwargs to "
                          "these to fine-tune it")


def validate(model: Any, regions: list[Region], spec: ModelSpec, tiling: SegmentConfig, device: str,
             precision: str, threads: int | None = None) -> Metrics:
    """Metrics of the model over the validation regions, predicted as ``geoseg run`` predicts a scene.

    Each region is predicted as a scene of its own (no context from outside it), so the score is what
    ``geoseg run`` on the region's raster and ``geoseg evaluate`` against its labels report.
    """
    n = len(spec.classes)
    total = Metrics.empty(spec.classes)
    for region in regions:
        target = region.target
        pred = predict_region(model, region, spec, tiling, device=device, precision=precision, threads=threads)
        # IGNORE (255) lies outside the class range
        total = total.merge(Metrics(confusion_matrix(target, pred, n), spec.classes))
    return total


def holdout_path(output: Path) -> Path:
    """Where a refit run keeps the checkpoint of its first, held-out run: ``NAME.holdout.safetensors``."""
    return output.with_name(f"{output.stem}.holdout{output.suffix}")


def train_model(cfg: TrainConfig, *, resume: bool = False, progress: bool = False) -> TrainResult:
    """Train, validate every epoch and keep the weights ``cfg.selection`` names at ``cfg.output``.

    With ``cfg.refit``, a first run on the training area (its checkpoint kept as :func:`holdout_path`)
    chooses the epoch count, and a second run from the start on all labelled pixels trains that many
    epochs; its weights are the checkpoint. With ``resume``, continue from the training state of an earlier
    run of the same config (written after every epoch); the result is the one the uninterrupted run would
    have given.
    """
    if not cfg.refit:
        return _train(cfg, resume=resume, progress=progress)
    first_cfg = cfg.model_copy(update={"output": holdout_path(cfg.output), "refit": False})
    if not resume:  # both refused before an hour of training, not after
        check_overwrite(cfg.output, cfg.overwrite)
        check_overwrite(first_cfg.output, cfg.overwrite)
    first = _finished(first_cfg) if resume else None
    if first is None:
        first = _train(first_cfg, resume=resume and TrainPaths.for_output(first_cfg.output).state.exists(),
                       progress=progress)
    epochs = first.best_epoch if cfg.selection == "best" else int(first.history[-1]["epoch"])
    log.info("refit on all labelled pixels for %d epochs (the held-out run's %s)", epochs,
             f"best epoch, validation mIoU {first.best_miou:.4f}" if cfg.selection == "best" else "epochs")
    # The same schedule as the run that chose, stopped after its epochs: the refit's weights are those of the
    # chosen epoch, trained on more pixels (a schedule compressed into fewer epochs would anneal earlier).
    final = cfg.model_copy(update={"refit": False, "patience": None,
                                   "selection": "last" if cfg.selection == "best" else cfg.selection})
    return _train(final, resume=resume and TrainPaths.for_output(cfg.output).state.exists(), progress=progress,
                  refit_of=first, stop_after=epochs)


def _finished(cfg: TrainConfig) -> TrainResult | None:
    """The result of a run of ``cfg`` that trained to its end (from its state and checkpoint), else None."""
    from geoseg.models import read_model_spec

    paths = TrainPaths.for_output(cfg.output)
    if not (paths.state.exists() and paths.checkpoint.exists()):
        return None
    state = _load_state(paths.state, cfg)
    if state["epoch"] < cfg.epochs and not state["stopped_early"]:
        return None
    kept = read_model_spec(paths.checkpoint).provenance
    return TrainResult(paths.checkpoint, state["best_epoch"], state["best_miou"], json.loads(state["history"]),
                       state["stopped_early"], kept.get("selection", "best"), kept.get("val_miou"))


class _Averages:
    """The averaged weights of ``selection`` swa (end-of-epoch weights) or ema (every step); none otherwise."""

    def __init__(self, model: Any, cfg: TrainConfig, last: int) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.cfg, self.last = cfg, last
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
                    if cfg.selection == "ema" else None)
        self.swa: dict[str, Any] | None = None
        self.swa_count = 0

    def step(self, model: Any) -> None:
        """After an optimiser step."""
        if self.ema is not None:
            self.ema.update_parameters(model)

    def epoch_end(self, model: Any, epoch: int) -> None:
        """After an epoch: the swa window's epochs enter the running mean."""
        if self.cfg.selection != "swa" or epoch <= self.last - self.cfg.swa_epochs:
            return
        self.swa_count += 1
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.swa is None:
            self.swa = current
            return
        for k, v in current.items():  # running mean of the float tensors; counters are the latest
            self.swa[k] = self.swa[k] + (v - self.swa[k]) / self.swa_count if v.is_floating_point() else v

    def state(self) -> dict[str, Any]:
        """For the training state."""
        return {"ema": self.ema.state_dict() if self.ema is not None else None, "swa": self.swa,
                "swa_count": self.swa_count}

    def restore(self, state: dict[str, Any], device: str) -> None:
        """From a training state."""
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("swa") is not None:
            self.swa = {k: v.to(device) for k, v in state["swa"].items()}
        self.swa_count = state.get("swa_count", 0)

    def model(self, model: Any, batches: Any) -> Any:
        """The kept network: the averaged one (swa: batch-norm statistics recomputed on ``batches``) or ``model``."""
        import copy

        from torch.optim.swa_utils import update_bn

        if self.ema is not None:
            return self.ema.module
        if self.swa is None:
            return model
        net = copy.deepcopy(model)
        net.load_state_dict(self.swa)
        # The average of weights is not the weights the running statistics were measured under.
        update_bn(batches(), net)
        return net.eval()


def _train(cfg: TrainConfig, *, resume: bool, progress: bool, refit_of: TrainResult | None = None,
           stop_after: int | None = None) -> TrainResult:
    """One training run (:func:`train_model`); ``refit_of``: the held-out run whose epoch count this refit uses.

    ``stop_after``: end after that many epochs of the ``cfg.epochs``-epoch schedule (the refit).
    """
    import rasterio
    import torch

    from geoseg.domain import training_data_stats
    from geoseg.losses import class_weights_from_counts, create_loss
    from geoseg.models import create_model, output_stride, save_checkpoint
    from geoseg.progress import progress_bar

    holdout = refit_of is None
    paths = TrainPaths.for_output(cfg.output)
    if resume:
        if not paths.state.exists():
            raise InputError(f"{paths.state}: no training state to resume from; run without --resume")
    else:
        check_overwrite(cfg.output, cfg.overwrite)
    # bf16 autocast with channels-last trained the Landsat Unet 1.78x faster on an AVX512-BF16 CPU at the
    # same validation mIoU (benchmarks/bench_train_speed.py, docs/training.md)
    device, precision, rng = start_run(cfg.device, cfg.precision, cfg.seed, cfg.threads, cpu_bf16=True)

    train, val = load_regions(cfg, holdout=holdout)
    mean, std = band_stats(train)
    with rasterio.open(cfg.train[0].image) as src:
        dtype = src.dtypes[0]
    origin: dict[str, Any] = {"training_data": training_data_stats(train, dtype)}  # for the domain guard
    norm = normaliser(mean, std)
    n_classes = len(cfg.classes)
    counts = class_counts(train, n_classes)
    weights = class_weights_from_counts(counts, cfg.loss.class_weights)

    if cfg.init is not None:
        _check_init(cfg)
    model = create_model(cfg.model.architecture, cfg.model.encoder, len(cfg.bands), n_classes,
                         **cfg.model.arch_kwargs)
    if cfg.init is not None:  # (a resumed run then restores its own weights over them)
        from geoseg.transfer import init_from_checkpoint

        init = init_from_checkpoint(model, cfg.init, [b.name for b in cfg.bands], [c.id for c in cfg.classes])
        log.info("fine-tuning %s: %d classes kept, %d new; bands kept: %s", cfg.init, len(init["classes_kept"]),
                 len(init["classes_new"]), ", ".join(init["bands_kept"]) or "none")
        origin["init"] = init
    if cfg.model.encoder_weights is not None:  # (a resumed run then restores its own weights over them)
        from geoseg.transfer import load_encoder_weights

        loaded = load_encoder_weights(model, cfg.model.encoder_weights)
        log.info("encoder weights from %s (%s layout, %d tensors%s)", loaded.path, loaded.layout, loaded.loaded,
                 f"; {', '.join(loaded.adapted)} adapted to {len(cfg.bands)} bands" if loaded.adapted else "")
        origin["encoder_weights"] = loaded.describe()
    if refit_of is not None:
        origin["refit"] = {"epochs": stop_after, "schedule_epochs": cfg.epochs,
                           "holdout_checkpoint": refit_of.checkpoint.name, "holdout_selection": refit_of.selection,
                           "holdout_val_miou": refit_of.selected_miou, "holdout_best_epoch": refit_of.best_epoch}
    channels_last = cfg.channels_last if cfg.channels_last is not None else (device == "cpu" and precision == "bf16")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    spec = ModelSpec(
        architecture=cfg.model.architecture, encoder=cfg.model.encoder,
        bands=[{"index": b.index, "name": b.name} for b in cfg.bands], mean=mean, std=std,
        classes=[{"id": c.id, "name": c.name, "color": c.color if isinstance(c.color, str) else
                  "#{:02x}{:02x}{:02x}".format(*c.color)} for c in cfg.classes],
        tile_size=cfg.tile_size, arch_kwargs=dict(cfg.model.arch_kwargs), output_stride=output_stride(model),
    )
    tiling = SegmentConfig(model=cfg.output, tile=cfg.validation.tile, stitch=cfg.validation.stitch)
    if tiling.tile.size % spec.output_stride:
        raise ConfigError(f"validation.tile.size: {tiling.tile.size} is not divisible by the model's output stride "
                          f"{spec.output_stride}")
    if cfg.tile_size % spec.output_stride:
        raise ConfigError(f"tile_size: {cfg.tile_size} is not divisible by the model's output stride "
                          f"{spec.output_stride}")
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg)
    loss_fn = create_loss(cfg.loss.name, IGNORE, weights, focal_gamma=cfg.loss.focal_gamma,
                          second_weight=cfg.loss.second_weight).to(device)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    sampler = WindowSampler(train, n_classes, rng, class_balanced=cfg.sampling.class_balanced,
                            min_labelled=cfg.sampling.min_labelled)
    last = stop_after or cfg.epochs
    # On the CPU the validation is fp32 whatever the training precision: the score is what `geoseg run` with
    # infer.precision fp32 reports, and bf16 training is judged on the same scale as fp32 training.
    val_precision = "fp32" if device == "cpu" else precision
    averages = _Averages(model, cfg, last)
    data = [{"image": str(sc.image), "labels": str(sc.labels), "sha256": file_digest(sc.image)[:16]}
            for sc in cfg.train]

    def provenance(epoch: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
        scored = {} if metrics is None else {
            "val_miou": metrics["mean_iou"],
            "val_metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
            "val_confusion_matrix": metrics["confusion_matrix"]}
        return {"geoseg_version": __version__, "trained": datetime.now(timezone.utc).isoformat(), "epoch": epoch,
                "selection": cfg.selection, **scored, "seed": cfg.seed, "device": device, "precision": precision,
                "data": data, "config": dump_config(cfg), **origin}

    def bn_batches() -> Any:
        """Training windows for swa's batch-norm statistics, from a generator of their own (one epoch's worth)."""
        bn_rng = np.random.default_rng([cfg.seed, 1])
        bn_sampler = WindowSampler(train, n_classes, bn_rng, class_balanced=cfg.sampling.class_balanced,
                                   min_labelled=cfg.sampling.min_labelled)
        for _ in range(cfg.steps_per_epoch):
            yield torch.from_numpy(_batch(bn_sampler, cfg, norm, bn_rng)[0]).to(device)

    history: list[dict] = []
    best_miou, best_epoch, start, elapsed0 = -1.0, 0, 1, 0.0
    if resume:
        state = _load_state(paths.state, cfg)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        averages.restore(state, device)
        done = state["epoch"] * cfg.steps_per_epoch
        if state["epochs"] == cfg.epochs:
            sched.load_state_dict(state["scheduler"])
        else:  # more (or fewer) epochs than first planned: the schedule is stretched over the new total
            with warnings.catch_warnings():  # stepping the schedule alone, to where the run stopped
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(done):
                    sched.step()
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        history = json.loads(state["history"])
        best_miou, best_epoch = state["best_miou"], state["best_epoch"]
        start, elapsed0 = state["epoch"] + 1, history[-1]["elapsed_s"] if history else 0.0
        if start > last or state["stopped_early"]:
            why = "stopped early" if state["stopped_early"] else f"trained all {last} epochs"
            raise InputError(f"{paths.state}: nothing to resume: the run {why}; raise --epochs to train longer")
        log.info("resuming at epoch %d of %d (best so far: epoch %d, mIoU %.4f)", start, last, best_epoch,
                 best_miou)

    log.info("training %s/%s: epochs %d-%d of %d steps x %d windows of %d px on %s (%s); %s", cfg.model.architecture,
             cfg.model.encoder, start, last, cfg.steps_per_epoch, cfg.batch_size, cfg.tile_size, device,
             precision, f"validation on {len(val)} regions" if holdout else "refit: validation area trained on")
    bar = progress_bar((last - start + 1) * cfg.steps_per_epoch, "training", progress)
    started = time.perf_counter() - elapsed0
    stopped_early = False
    selected_miou: float | None = None
    for epoch in range(start, last + 1):
        model.train()
        if cfg.freeze_encoder_epochs:
            encoder: Any = model.encoder
            frozen = epoch <= cfg.freeze_encoder_epochs
            for p in encoder.parameters():
                p.requires_grad_(not frozen)
            if frozen:
                encoder.eval()  # its batch-norm statistics stay the ones it came with
        losses = []
        beat = time.monotonic()
        for step in range(1, cfg.steps_per_epoch + 1):
            xb, yb = _batch(sampler, cfg, norm, rng)
            xb = torch.from_numpy(xb).to(device).contiguous(memory_format=memory_format)
            yb = torch.from_numpy(yb).to(device)
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = loss_fn(model(xb), yb)
            losses.append(optimiser_step(loss, model, opt, sched, scaler, cfg.grad_clip))
            averages.step(model)
            if bar:
                bar.advance(bar.task_ids[0])
            elif time.monotonic() - beat >= HEARTBEAT_S:  # a log file hears from a long epoch too
                beat = time.monotonic()
                log.info("epoch %d: step %d/%d, loss %.4f", epoch, step, cfg.steps_per_epoch,
                         float(np.mean(losses[-20:])))
        model.eval()
        averages.epoch_end(model, epoch)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5)}
        metrics: dict[str, Any] | None = None
        if holdout:
            metrics = validate(model, val, spec, tiling, device, val_precision, cfg.threads).to_dict()
            miou = metrics["mean_iou"] if metrics["mean_iou"] is not None else float("nan")
            row.update({"val_miou": round(miou, 5),
                        "val_overall_accuracy": round(metrics["overall_accuracy"] or 0.0, 5)})
            if averages.ema is not None:
                ema = validate(averages.ema.module, val, spec, tiling, device, val_precision, cfg.threads).mean_iou
                row["val_miou_ema"] = round(ema if ema is not None else float("nan"), 5)
        row.update({"lr": sched.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - started, 1)})
        if metrics is not None:
            row.update({f"iou_{c['name']}": (None if c["iou"] is None or not c["support"] else round(c["iou"], 5))
                        for c in metrics["classes"]})
        history.append(row)
        log.info("epoch %d  loss %.4f%s", epoch, row["train_loss"],
                 f"  val mIoU {row['val_miou']:.4f}" if holdout else "")
        if metrics is not None and miou > best_miou:
            best_miou, best_epoch = miou, epoch
            if cfg.selection == "best":
                selected_miou = miou
                save_checkpoint(cfg.output, model, spec.model_copy(update={"provenance": provenance(epoch, metrics)}))
        stopped_early = cfg.patience is not None and epoch - best_epoch >= cfg.patience and epoch < last
        if cfg.selection != "best" and (epoch == last or stopped_early):
            kept = averages.model(model, bn_batches)
            scored = (validate(kept, val, spec, tiling, device, val_precision, cfg.threads).to_dict() if holdout
                      else None)
            selected_miou = scored["mean_iou"] if scored is not None else None
            if scored is not None:
                log.info("kept the %s weights: val mIoU %.4f", cfg.selection, selected_miou or float("nan"))
            save_checkpoint(cfg.output, kept, spec.model_copy(update={"provenance": provenance(epoch, scored)}))
        _write_log(paths.log, history)
        plot_curves(history, paths.curves)
        _save_state(paths.state, cfg, epoch, model, opt, sched, scaler, rng, history, best_miou, best_epoch,
                    stopped_early, averages.state())
        if stopped_early:
            log.info("early stop: no better validation mIoU for %d epochs", cfg.patience)
            break
    if bar:
        bar.stop()
    if paths.checkpoint.exists():
        record_precision_check(cfg.output, val, tiling, cfg.threads)
    if selected_miou is None and holdout and cfg.selection == "best":
        selected_miou = best_miou if best_epoch else None
    return TrainResult(cfg.output, best_epoch, best_miou, history, stopped_early, cfg.selection, selected_miou)


def precision_check(model: Any, regions: list[Region], spec: ModelSpec, tiling: SegmentConfig,
                    threads: int | None = None) -> dict[str, Any]:
    """How the model's classes change in bf16 (CPU): what ``precision: auto`` is guarded by.

    The validation regions are predicted in fp32 and in bf16 (both as ``geoseg run`` predicts, in its
    memory format); the record holds the share of labelled pixels classified alike and both mIoUs.
    """
    scores = {p: [predict_region(model, r, spec, tiling, precision=p, threads=threads) for r in regions]
              for p in ("fp32", "bf16")}
    same, total = 0, 0
    metrics = {p: Metrics.empty(spec.classes) for p in scores}
    for k, region in enumerate(regions):
        keep = region.target != IGNORE
        a, b = scores["fp32"][k], scores["bf16"][k]
        same += int((a == b)[keep].sum())
        total += int(keep.sum())
        for p in scores:
            metrics[p] = metrics[p].merge(Metrics(confusion_matrix(region.target, scores[p][k], len(spec.classes)),
                                                  spec.classes))
    return {"bf16_agreement": same / total if total else None, "pixels": total,
            "fp32_miou": metrics["fp32"].mean_iou, "bf16_miou": metrics["bf16"].mean_iou}


def record_precision_check(checkpoint: Path, regions: list[Region], tiling: SegmentConfig,
                           threads: int | None = None) -> None:
    """Write :func:`precision_check` of the saved checkpoint into its provenance."""
    from geoseg.models import build_model, load_checkpoint, save_checkpoint

    spec, state = load_checkpoint(checkpoint)
    model = build_model(spec, state)
    check = precision_check(model, regions, spec, tiling, threads)
    log.info("bf16 check: %.4f%% of validation pixels classified as in fp32 (mIoU %.4f vs %.4f)",
             100 * (check["bf16_agreement"] or 0), check["bf16_miou"] or 0, check["fp32_miou"] or 0)
    save_checkpoint(checkpoint, model, spec.model_copy(update={
        "provenance": {**spec.provenance, "precision_check": check}}))


def _state_fingerprint(cfg: TrainConfig) -> str:
    full = dump_config(cfg)
    return json.dumps({k: full[k] for k in _STATE_KEYS}, sort_keys=True)


def _save_state(path: Path, cfg: TrainConfig, epoch: int, model, opt, sched, scaler, rng: np.random.Generator,  # noqa: ANN001
                history: list[dict], best_miou: float, best_epoch: int, stopped_early: bool,
                averages: dict[str, Any]) -> None:
    """Everything needed to continue after ``epoch``; tensors and plain values only (loads with weights_only)."""
    import torch

    state = {
        "format": "geoseg-train-state", "epoch": epoch, "epochs": cfg.epochs, "fingerprint": _state_fingerprint(cfg),
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(rng.bit_generator.state), "history": json.dumps(history),
        "best_miou": best_miou, "best_epoch": best_epoch, "stopped_early": stopped_early, **averages,
    }
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, cfg: TrainConfig) -> dict:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable training state ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(state, dict) or state.get("format") != "geoseg-train-state":
        raise CheckpointError(f"{path}: not a geoseg training state")
    if state["fingerprint"] != _state_fingerprint(cfg):
        saved, now = json.loads(state["fingerprint"]), json.loads(_state_fingerprint(cfg))
        changed = ", ".join(k for k in _STATE_KEYS if saved.get(k) != now.get(k))
        raise ConfigError(f"{path}: made with a different config ({changed} changed); only epochs may change "
                          "on --resume")
    return state


def _write_log(path: Path, history: list[dict]) -> None:
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation mIoU / per-class IoU per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", color="#444444")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    if "val_miou" not in history[0]:  # a refit: the validation area is trained on
        right.text(0.5, 0.5, "refit on all labelled pixels:\nno held-out validation", ha="center", va="center")
    else:
        right.plot(epochs, [h["val_miou"] for h in history], marker="o", color="black", linewidth=2, label="mIoU")
    if "val_miou_ema" in history[0]:
        right.plot(epochs, [h["val_miou_ema"] for h in history], marker="s", color="black", linestyle="--",
                   label="mIoU, ema weights")
    for key in [k for k in history[0] if k.startswith("iou_")]:
        values = [h[key] if h[key] is not None else np.nan for h in history]
        right.plot(epochs, values, linewidth=1, alpha=0.8, label=key[4:])
    right.set(xlabel="epoch", ylabel="IoU", title="validation", ylim=(0, 1))
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7, loc="lower right")
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)

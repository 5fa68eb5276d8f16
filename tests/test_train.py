"""`geoseg train`: learns on a synthetic scene, is reproducible, resumable, never validates on training pixels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from rasterio.windows import Window

from geoseg.config import AugmentConfig, TrainConfig, load_config
from geoseg.errors import ConfigError, InputError, OutputExistsError
from geoseg.models import load_checkpoint
from geoseg.sample import BANDS, CLASSES
from geoseg.train import TrainPaths, train_model
from geoseg.training_data import IGNORE, Region, WindowSampler, augment, class_counts, resample


@pytest.fixture
def train_yaml(tmp_path, sample_scene):  # noqa: ANN001
    def make(**extra) -> TrainConfig:  # noqa: ANN003
        data = {
            "output": str(tmp_path / "m.safetensors"),
            "model": {"architecture": "fcn", "encoder": "none", "arch_kwargs": {"depth": 4, "width": 24}},
            "bands": [{"index": i + 1, "name": b} for i, b in enumerate(BANDS)],
            "classes": [{**c, "codes": [c["id"]]} for c in CLASSES],
            "ignore_codes": [0],
            "train": [{"image": str(sample_scene.image), "labels": str(sample_scene.labels)}],
            "validation": {"window": {"row_off": 200, "height": 100}},
            "tile_size": 64, "batch_size": 8, "epochs": 5, "steps_per_epoch": 15, "lr": 0.01, "seed": 3,
            "threads": 2,
        }
        data.update(extra)
        path = tmp_path / "t.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, model=TrainConfig)

    return make


def _weights_equal(a, b) -> bool:  # noqa: ANN001
    sa, sb = load_checkpoint(a)[1], load_checkpoint(b)[1]
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa)


@pytest.mark.slow
def test_training_learns_and_is_reproducible(train_yaml, tmp_path):  # noqa: ANN001
    cfg = train_yaml()
    first = train_model(cfg)
    losses = [h["train_loss"] for h in first.history]
    assert losses[-1] < 0.6 * losses[0]
    # built-up barely occurs in the training rows of this small scene, so it caps the mIoU near 0.8
    assert first.best_miou >= 0.65, first.history
    spec, _ = load_checkpoint(first.checkpoint)
    assert spec.provenance["epoch"] == first.best_epoch and spec.tile_size == 64 and len(spec.mean) == 4
    assert spec.provenance["val_metrics"]["mean_iou"] == pytest.approx(first.best_miou)
    paths = TrainPaths.for_output(first.checkpoint)
    assert paths.log.read_text().startswith("epoch,train_loss,val_miou,val_overall_accuracy,lr,elapsed_s,iou_water")
    assert paths.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths.state.exists()
    again = train_model(cfg.model_copy(update={"output": tmp_path / "m2.safetensors"}))
    assert [h["val_miou"] for h in again.history] == [h["val_miou"] for h in first.history]
    assert _weights_equal(first.checkpoint, again.checkpoint)


def test_validation_mious_are_the_evaluation_metrics(train_yaml, sample_scene):  # noqa: ANN001
    """The per-epoch validation numbers are the evaluate stage's, recomputed here independently."""
    import rasterio

    from geoseg.config import SegmentConfig
    from geoseg.models import build_model
    from geoseg.train import predict_region

    result = train_model(train_yaml(epochs=1))
    spec, state = load_checkpoint(result.checkpoint)
    with rasterio.open(sample_scene.image) as img, rasterio.open(sample_scene.labels) as lab:
        image = img.read()[:, 200:300].astype(np.float32)
        valid = img.read_masks(1)[200:300] > 0
        labels = lab.read(1)[200:300]
    pred = predict_region(build_model(spec, state), Region(image, labels, "val", valid=valid), spec,
                          SegmentConfig(model=result.checkpoint), threads=2)
    ious = []
    for k, c in enumerate(CLASSES):
        truth, guess = (labels == c["id"]), (pred == k) & (labels != 0)
        if truth.any():
            ious.append((truth & guess).sum() / (truth | guess).sum())
    assert result.best_miou == pytest.approx(np.mean(ious), abs=1e-12)


def _crop(src_path, dst_path, window: Window):  # noqa: ANN001, ANN202
    """The ``window`` of a raster as a GeoTIFF of its own (same bands, nodata and georeferencing)."""
    import rasterio

    with rasterio.open(src_path) as src:
        profile = {**src.profile, "height": int(window.height), "width": int(window.width),
                   "transform": src.window_transform(window)}
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return dst_path


def test_validation_score_is_run_plus_evaluate_on_the_validation_area(train_yaml, sample_scene, tmp_path,
                                                                      client):  # noqa: ANN001
    """The kept checkpoint's validation metrics are what `geoseg run` + evaluate report on that area, exactly."""
    from geoseg.pipeline import run_pipeline
    from tests.conftest import pipeline_config

    cfg = train_yaml(model={"architecture": "unet", "encoder": "resnet18",
                            "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
                     epochs=2, steps_per_epoch=5, validation={"window": {"row_off": 0, "height": 100},
                                                              "tile": {"size": 64, "overlap": 16}})
    result = train_model(cfg)
    spec, _ = load_checkpoint(result.checkpoint)
    window = Window(0, 0, 340, 100)  # holds the sample's nodata corner: the pipeline's rule for it is kept too
    image = _crop(sample_scene.image, tmp_path / "val-image.tif", window)
    labels = _crop(sample_scene.labels, tmp_path / "val-labels.tif", window)
    run = run_pipeline(pipeline_config(image, result.checkpoint, tmp_path / "run", tile={"size": 64, "overlap": 16},
                                       infer={"precision": "fp32", "torch_threads": 2},
                                       vectorize={"enabled": False},
                                       evaluate={"reference": str(labels), "ignore": [0]}), client=client)
    kept = spec.provenance
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    assert kept["epoch"] == result.best_epoch
    assert metrics["confusion_matrix"] == kept["val_confusion_matrix"]
    assert metrics["mean_iou"] == kept["val_miou"] == result.best_miou
    assert [c["iou"] for c in metrics["classes"]] == [c["iou"] for c in kept["val_metrics"]["classes"]]


@pytest.mark.parametrize("balanced", [False, True], ids=["uniform", "class-balanced"])
def test_validation_windows_never_overlap_training_windows(balanced):  # noqa: ANN001
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (200, 200)).astype(np.uint8)
    exclude = Window(50, 60, 70, 40)
    region = Region(np.zeros((1, 200, 200), np.float32), target, "r", exclude)
    sampler = WindowSampler([region], 3, rng, class_balanced=balanced)
    for _ in range(500):
        _, r, c = sampler.sample(32)
        assert r + 32 <= 60 or r >= 100 or c + 32 <= 50 or c >= 120


def test_class_balanced_sampling_shows_rare_classes_more_often():
    target = np.zeros((256, 256), np.uint8)
    target[200:210, 30:40] = 1  # 100 of 65536 pixels
    region = Region(np.zeros((1, 256, 256), np.float32), target, "r")

    def rare_share(balanced: bool) -> float:
        sampler = WindowSampler([region], 2, np.random.default_rng(2), class_balanced=balanced)
        hits = [(target[r : r + 32, c : c + 32] == 1).mean() for _, r, c in (sampler.sample(32) for _ in range(400))]
        return float(np.mean(hits))

    assert rare_share(True) > 10 * rare_share(False)
    assert class_counts([region], 2).tolist() == [65536 - 100, 100]


def test_augmentations_keep_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, (24, 24)).astype(np.uint8)
    x = np.stack([y * 10.0, y * -3.0]).astype(np.float32)  # pixels carry their own label
    cfg = AugmentConfig(brightness=0.0, contrast=0.0)
    seen = set()
    for _ in range(40):
        xa, ya = augment(x, y, rng, cfg)
        assert np.array_equal(xa[0], ya * 10.0) and np.array_equal(xa[1], ya * -3.0)
        seen.add(ya.tobytes())
    assert len(seen) == 8  # the eight symmetries of the square
    jitter = AugmentConfig(flips=False, rotate90=False, brightness=0.2, contrast=0.3)
    xa, ya = augment(x, y, rng, jitter)
    assert np.array_equal(ya, y) and not np.array_equal(xa, x)
    gain = (xa[0] - xa[0].min()) / np.where(x[0] - x[0].min() == 0, 1, x[0] - x[0].min())
    assert np.allclose(gain[y > 0], gain[y > 0].flat[0], atol=1e-5) and 0.7 <= gain[y > 0].flat[0] <= 1.3


def test_scale_jitter_resamples_bands_bilinear_and_labels_nearest():
    y = np.kron(np.array([[1, 2], [3, 4]], np.uint8), np.ones((20, 20), np.uint8))
    x = y[None].astype(np.float32)
    xs, ys = resample(x, y, 16)
    assert xs.shape == (1, 16, 16) and ys.shape == (16, 16) and set(np.unique(ys)) == {1, 2, 3, 4}
    assert ys[0, 0] == 1 and ys[-1, -1] == 4 and xs.dtype == np.float32


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(train_yaml, tmp_path, monkeypatch):  # noqa: ANN001
    import geoseg.train as train

    cfg = train_yaml(epochs=4, steps_per_epoch=6, schedule="cosine", loss={"name": "ce+dice"},
                     augment={"brightness": 0.1, "contrast": 0.1, "scale": 0.2}, sampling={"class_balanced": True})
    full = train_model(cfg.model_copy(update={"output": tmp_path / "full.safetensors"}))

    real_validate, calls = train.validate, []

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during epoch 3
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_model(cfg)
    monkeypatch.setattr(train, "validate", real_validate)
    logged = TrainPaths.for_output(cfg.output).log.read_text().splitlines()
    assert [line.split(",")[0] for line in logged[1:]] == ["1", "2"]  # epochs 1 and 2 finished and saved
    with pytest.raises(OutputExistsError):
        train_model(cfg)  # without --resume the checkpoint is not overwritten
    resumed = train_model(cfg, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    strip = lambda hs: [{k: v for k, v in h.items() if k != "elapsed_s"} for h in hs]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert (resumed.best_epoch, resumed.best_miou) == (full.best_epoch, full.best_miou)
    assert _weights_equal(resumed.checkpoint, full.checkpoint)
    with pytest.raises(InputError, match="nothing to resume"):
        train_model(cfg, resume=True)
    with pytest.raises(ConfigError, match=r"different config \(loss changed\)"):
        train_model(cfg.model_copy(update={"epochs": 6, "loss": cfg.loss.model_copy(update={"name": "focal"})}),
                     resume=True)
    longer = train_model(cfg.model_copy(update={"epochs": 5}), resume=True)
    assert [h["epoch"] for h in longer.history] == [1, 2, 3, 4, 5]


def test_early_stopping(train_yaml, monkeypatch):  # noqa: ANN001
    import geoseg.train as train

    right = iter([50, 70, 60, 70, 65, 90, 90])  # best at epoch 2, then two epochs without a better one

    def fixed(model, regions, spec, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        from geoseg.evaluate import Metrics

        cm = np.diag([100] * 6)  # six classes; class 0 gets `right` of its 100 pixels, the rest go to class 1
        t = next(right)
        cm[0, 0], cm[0, 1] = t, 100 - t
        return Metrics(cm, spec.classes)

    monkeypatch.setattr(train, "validate", fixed)
    result = train_model(train_yaml(epochs=7, steps_per_epoch=1, patience=2))
    assert result.stopped_early and [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 2


def test_validation_must_be_held_out(train_yaml):  # noqa: ANN001
    with pytest.raises(ConfigError, match="validation: needs scenes or a window"):
        train_yaml(validation={})


def test_class_weights_must_match_the_classes(train_yaml):  # noqa: ANN001
    with pytest.raises(ConfigError, match="loss.class_weights: 2 weights for 6 classes"):
        train_yaml(loss={"class_weights": [1, 2]})


def test_windows_larger_than_the_training_area_are_refused(train_yaml):  # noqa: ANN001
    with pytest.raises(InputError, match="cannot find 256px training windows"):
        train_model(train_yaml(tile_size=256, model={"architecture": "fcn", "encoder": "none",
                                                     "arch_kwargs": {"depth": 2, "width": 8}}))


def test_unlabelled_pixels_are_ignored():
    target = np.full((40, 40), IGNORE, np.uint8)
    region = Region(np.zeros((1, 40, 40), np.float32), target, "empty")
    with pytest.raises(InputError):
        WindowSampler([region], 2, np.random.default_rng(0)).sample(16)


def _state(path):  # noqa: ANN001, ANN202
    return {k: v.numpy() for k, v in load_checkpoint(path)[1].items()}


def test_selection_modes_keep_the_weights_they_name(train_yaml, tmp_path, monkeypatch):  # noqa: ANN001
    """last is the last epoch's; swa the mean of its window's epochs (batch norm recomputed); ema an average
    unlike any epoch's; the averages never change the training itself; each loads and runs like any checkpoint."""
    import geoseg.train as train

    epochs: dict[str, list[dict]] = {}
    real_end = train._Averages.epoch_end

    def record(self, model, epoch: int) -> None:  # noqa: ANN001
        epochs.setdefault(self.cfg.selection, []).append({k: v.detach().numpy().copy()
                                                          for k, v in model.state_dict().items()})
        real_end(self, model, epoch)

    monkeypatch.setattr(train._Averages, "epoch_end", record)
    runs = {}
    for mode in ("last", "swa", "ema"):
        cfg = train_yaml(epochs=3, steps_per_epoch=6, selection=mode, swa_epochs=2,
                         output=str(tmp_path / f"{mode}.safetensors"))
        runs[mode] = train_model(cfg)
    # the same seed trains the same network whatever is kept
    assert [h["val_miou"] for h in runs["swa"].history] == [h["val_miou"] for h in runs["last"].history]
    assert [h["val_miou"] for h in runs["ema"].history] == [h["val_miou"] for h in runs["last"].history]
    last, swa, ema = (_state(runs[m].checkpoint) for m in ("last", "swa", "ema"))
    per_epoch = epochs["last"]
    assert all(np.array_equal(last[k], per_epoch[-1][k]) for k in last)
    params = [k for k in swa if "running" not in k and "num_batches" not in k]
    for k in params:
        np.testing.assert_allclose(swa[k], (per_epoch[1][k] + per_epoch[2][k]) / 2, rtol=1e-6, atol=1e-7)
    bn = [k for k in swa if k.endswith("running_mean")]
    assert bn and not all(np.allclose(swa[k], (per_epoch[1][k] + per_epoch[2][k]) / 2) for k in bn)
    for weights in (swa, ema):
        assert all(not all(np.array_equal(weights[k], e[k]) for k in params) for e in per_epoch)
    for mode, result in runs.items():
        kept = load_checkpoint(result.checkpoint)[0].provenance
        assert kept["selection"] == mode and kept["epoch"] == 3 and kept["val_miou"] == result.selected_miou
    assert runs["last"].selected_miou == pytest.approx(runs["last"].history[-1]["val_miou"], abs=1e-5)
    assert runs["ema"].selected_miou == pytest.approx(runs["ema"].history[-1]["val_miou_ema"], abs=1e-5)
    assert "val_miou_ema" in TrainPaths.for_output(runs["ema"].checkpoint).log.read_text().splitlines()[0]


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_averaged_selection_resumes_to_the_same_weights(train_yaml, tmp_path, monkeypatch, mode):  # noqa: ANN001
    import geoseg.train as train

    cfg = train_yaml(epochs=3, steps_per_epoch=4, selection=mode, swa_epochs=2)
    full = train_model(cfg.model_copy(update={"output": tmp_path / "full.safetensors"}))
    real_end = train._Averages.epoch_end

    def interrupted(self, model, epoch: int) -> None:  # noqa: ANN001
        if epoch == 3:
            raise KeyboardInterrupt
        real_end(self, model, epoch)

    monkeypatch.setattr(train._Averages, "epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_model(cfg)
    monkeypatch.setattr(train._Averages, "epoch_end", real_end)
    resumed = train_model(cfg, resume=True)
    assert resumed.selected_miou == full.selected_miou
    assert _weights_equal(resumed.checkpoint, full.checkpoint)


def test_refit_trains_on_the_validation_pixels_for_the_chosen_epochs(train_yaml, tmp_path, monkeypatch):  # noqa: ANN001
    import geoseg.train as train
    from geoseg.training_data import band_stats, load_regions

    windows: list[list[tuple[int, int, int]]] = []
    real_init, real_sample = WindowSampler.__init__, WindowSampler.sample

    def init(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        real_init(self, *args, **kwargs)
        windows.append([])
        self.drawn = windows[-1]

    def sample(self, side: int):  # noqa: ANN202
        reg, r, c = real_sample(self, side)
        self.drawn.append((r, c, side))
        return reg, r, c

    monkeypatch.setattr(WindowSampler, "__init__", init)
    monkeypatch.setattr(WindowSampler, "sample", sample)
    cfg = train_yaml(epochs=3, steps_per_epoch=6, refit=True)
    result = train_model(cfg)
    held_out, refit = windows  # one sampler per run
    in_validation = lambda ws: sum(r + side > 200 for r, _, side in ws)  # noqa: E731 - rows 200-299 validate
    assert in_validation(held_out) == 0 and in_validation(refit) > 0
    first = load_checkpoint(train.holdout_path(cfg.output))[0].provenance
    spec, _ = load_checkpoint(result.checkpoint)
    kept = spec.provenance
    assert "val_miou" not in kept and result.selected_miou is None  # the validation area was trained on
    assert kept["selection"] == "last" and kept["refit"]["holdout_selection"] == "best"
    assert kept["refit"]["epochs"] == first["epoch"] == kept["epoch"] and len(result.history) == first["epoch"]
    assert kept["refit"]["holdout_val_miou"] == first["val_miou"]
    with open(TrainPaths.for_output(train.holdout_path(cfg.output)).log) as f:  # the chosen epochs' schedule
        assert [h["lr"] for h in result.history] == [float(r["lr"]) for r in csv.DictReader(f)][: first["epoch"]]
    all_train, _ = load_regions(cfg, holdout=False)
    assert spec.mean == pytest.approx(band_stats(all_train)[0], rel=1e-12)
    assert spec.mean != pytest.approx(band_stats(load_regions(cfg)[0])[0], rel=1e-6)
    with pytest.raises(OutputExistsError):
        train_model(cfg)
    with pytest.raises(InputError, match="nothing to resume"):  # the held-out run is found finished, then the refit
        train_model(cfg, resume=True)


def test_auto_precision_trains_bf16_channels_last_only_where_the_cpu_has_bf16(train_yaml, tmp_path,
                                                                              monkeypatch):  # noqa: ANN001
    import torch

    import geoseg.device
    import geoseg.train as train

    seen = []
    real = train.optimiser_step

    def spy(loss, model, *args):  # noqa: ANN001, ANN002, ANN202
        seen.append(next(model.parameters()).is_contiguous(memory_format=torch.channels_last))
        return real(loss, model, *args)

    monkeypatch.setattr(train, "optimiser_step", spy)
    for has_bf16 in (False, True):
        monkeypatch.setattr(geoseg.device, "cpu_has_bf16", lambda v=has_bf16: v)
        result = train_model(train_yaml(epochs=1, steps_per_epoch=2, output=str(tmp_path / f"{has_bf16}.safetensors"),
                                        device="cpu"))
        kept = load_checkpoint(result.checkpoint)[0].provenance
        assert kept["precision"] == ("bf16" if has_bf16 else "fp32")
    assert seen == [False, False, True, True]  # the weights are channels-last only under bf16

"""A geoseg model against the baselines a user might pick instead, in one run, on the same pixels.

Trains the segmentation model of a training config (`geoseg train`), then fits a per-pixel random forest
(scikit-learn) on the same training pixels and bands, and takes the majority class of the training pixels.
All three are scored on the config's validation area with the evaluation stage's metrics
(`metrics_from_confusion`): per-class IoU, mIoU over the classes present in the validation reference, and
overall accuracy. The segmentation model is reported twice: its last epoch (no model selection) and the
epoch with the best validation mIoU (the checkpoint `geoseg train` keeps; that choice saw the validation
area, so it is optimistic).

    python benchmarks/bench_train_baselines.py configs/train-nc-landsat7.yaml
    python benchmarks/bench_train_baselines.py configs/train-flair2.yaml --trees 100

Needs the real data under ../shared/data (see its README); exits with a message where it is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine  # noqa: E402


def score(cm: np.ndarray, classes) -> dict:  # noqa: ANN001
    from geoseg.evaluate import Metrics

    return Metrics(cm, classes).to_dict()


def model_metrics(checkpoint_or_state: Path, spec, val, tiling) -> dict:  # noqa: ANN001
    """Validation metrics of a checkpoint (or of the last-epoch weights in a training state)."""
    import torch

    from geoseg.models import build_model, load_checkpoint
    from geoseg.train import validate

    if checkpoint_or_state.suffix == ".pt":
        state = torch.load(checkpoint_or_state, map_location="cpu", weights_only=True)["model"]
    else:
        state = load_checkpoint(checkpoint_or_state)[1]
    return validate(build_model(spec, state), val, spec, tiling, "cpu", "fp32").to_dict()


def pixels(regions, trainable: bool, limit: int | None, rng: np.random.Generator):  # noqa: ANN001, ANN202
    """(features, targets) of the labelled pixels of ``regions`` (the trainable ones for training)."""
    from geoseg.training_data import IGNORE

    xs, ys = [], []
    for r in regions:
        keep = r.trainable if trainable else r.target != IGNORE
        xs.append(r.image[:, keep].T)
        ys.append(r.target[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if limit and len(y) > limit:
        pick = rng.choice(len(y), limit, replace=False)
        x, y = x[pick], y[pick]
    return x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--trees", type=int, default=200, help="random forest size")
    p.add_argument("--rf-max-pixels", type=int, default=300_000, help="training pixels for the forest (subsampled)")
    args = p.parse_args()
    malloc = control_malloc(True)

    from sklearn.ensemble import RandomForestClassifier

    from geoseg.config import TrainConfig, load_config
    from geoseg.errors import GeosegError
    from geoseg.models import read_model_spec
    from geoseg.train import TrainPaths, train_model
    from geoseg.training_data import class_counts, load_regions

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-baselines-"))
    try:
        cfg = load_config(args.config, [*args.overrides, f"output={tmp / 'model.safetensors'}"], TrainConfig)
    except GeosegError as exc:
        sys.exit(f"cannot run this benchmark: {exc} (the real data lives in ../shared/data; see its README)")
    print(f"machine: {machine()}\nmalloc: {malloc}\nconfig: {args.config} ({cfg.model.architecture}-"
          f"{cfg.model.encoder}, {cfg.epochs} epochs x {cfg.steps_per_epoch} steps x {cfg.batch_size} windows of "
          f"{cfg.tile_size} px)", flush=True)

    t0 = time.perf_counter()
    result = train_model(cfg)
    train_s = time.perf_counter() - t0
    spec = read_model_spec(result.checkpoint)
    n = len(spec.classes)
    train, val = load_regions(cfg)
    from geoseg.config import SegmentConfig

    tiling = SegmentConfig(model=result.checkpoint, tile=cfg.validation.tile, stitch=cfg.validation.stitch)
    rows = {
        "geoseg (last epoch)": model_metrics(TrainPaths.for_output(result.checkpoint).state, spec, val, tiling),
        f"geoseg (best epoch {result.best_epoch})": model_metrics(result.checkpoint, spec, val, tiling),
    }

    rng = np.random.default_rng(0)
    x, y = pixels(train, True, args.rf_max_pixels, rng)
    t0 = time.perf_counter()
    forest = RandomForestClassifier(args.trees, n_jobs=-1, random_state=0).fit(x, y)
    rf_s = time.perf_counter() - t0
    from geoseg.evaluate import confusion_matrix

    xv, yv = pixels(val, False, None, rng)
    rows["random forest (per pixel)"] = score(confusion_matrix(yv, forest.predict(xv), n), spec.classes)
    majority = int(np.argmax(class_counts(train, n)))
    rows["majority class"] = score(confusion_matrix(yv, np.full_like(yv, majority), n), spec.classes)

    names = spec.classes.names
    print(f"\ntraining: geoseg {train_s:.0f}s, random forest {rf_s:.0f}s ({len(y)} pixels, {args.trees} trees); "
          f"validation: {len(yv)} labelled pixels\n")
    print("| method | " + " | ".join(names) + " | mIoU | OA |")
    print("| --- |" + " --- |" * (len(names) + 2))
    for method, m in rows.items():
        ious = [f"{c['iou']:.3f}" if c["iou"] is not None and c["support"] else "-" for c in m["classes"]]
        print(f"| {method} | " + " | ".join(ious) + f" | **{m['mean_iou']:.3f}** | {m['overall_accuracy']:.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"baselines-{args.config.stem}.json"
    out.write_text(json.dumps({"machine": machine(), "config": str(args.config), "train_seconds": train_s,
                               "history": result.history, "methods": rows}, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

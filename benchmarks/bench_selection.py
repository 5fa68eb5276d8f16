"""Which weights to keep? best / last / swa / ema, and a refit on all labelled pixels, over several seeds.

For each seed the training config is trained twice with the same seed, ``selection: ema`` and
``selection: swa``: the averages never touch the training, so both runs train the same network (checked)
and one pair of runs gives every mode: the best validation epoch (chosen on the validation area itself, so
optimistic there), the last epoch, the SWA and the EMA weights, all scored on the config's validation area
with the evaluation stage's metrics (what `geoseg run` + `geoseg evaluate` report there).

The refit cannot be scored on an area it trained on, so it is measured nested: the scene is cut above
the validation window (rows ``0..row_off``), the last ``--inner`` rows of that cut choose the epoch count,
the refit trains on the whole cut, and both the inner run's best checkpoint and the refit are scored on the
same validation window as the other modes, which neither saw.

    python benchmarks/bench_selection.py configs/train-nc-landsat7.yaml
    python benchmarks/bench_selection.py configs/train-nc-landsat7.yaml --seeds 0 --set epochs=5   # quick look

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
from _common import RESULTS, control_malloc, machine, sample_sd  # noqa: E402
from bench_train_baselines import model_metrics  # noqa: E402

MODES = ("best", "last", "swa", "ema", "nested best", "nested refit")


def crop_above(path: Path, rows: int, out: Path) -> Path:
    """Rows ``0..rows`` of a raster as a GeoTIFF of its own (same bands, nodata and georeferencing)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        window = Window(0, 0, src.width, rows)
        profile = {**src.profile, "height": rows, "transform": src.window_transform(window)}
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read(window=window))
            dst.update_tags(**src.tags())
            for b in range(1, src.count + 1):
                dst.set_band_description(b, src.descriptions[b - 1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_config", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--inner", type=int, default=50, help="rows above the validation window that choose the "
                   "refit's epoch count (nested)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--nested-only", action="store_true", help="only the nested runs (best and refit)")
    args = p.parse_args()
    malloc = control_malloc(True)

    from geoseg.config import SegmentConfig, TrainConfig, load_config
    from geoseg.device import cpu_has_bf16
    from geoseg.errors import GeosegError
    from geoseg.models import read_model_spec
    from geoseg.train import TrainPaths, holdout_path, train_model
    from geoseg.training_data import load_regions

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-selection-"))
    try:
        base = load_config(args.train_config, [f"output={tmp / 'probe.safetensors'}", *args.overrides], TrainConfig)
    except GeosegError as exc:
        sys.exit(f"cannot run this benchmark: {exc} (the real data lives in ../shared/data; see its README)")
    window = base.validation.window
    nested_ok = window is not None and not window.col_off and not window.width and len(base.train) == 1
    if not nested_ok:  # validation scenes (the aerial patches): nothing to cut a nested area from
        print("no nested refit: the config does not validate on a band of full-width rows of one scene")
        if args.nested_only:
            sys.exit("--nested-only needs one training scene validated on a band of full-width rows")
    print(f"machine: {machine()}, bf16 CPU: {cpu_has_bf16()}\nmalloc: {malloc}\nconfig: {args.train_config} "
          f"{args.overrides} ({base.model.architecture}-{base.model.encoder}, {base.epochs} epochs x "
          f"{base.steps_per_epoch} steps x {base.batch_size}); swa over {base.swa_epochs} epochs, ema decay "
          f"{base.ema_decay}; seeds {args.seeds}", flush=True)
    _, val = load_regions(base)
    if nested_ok:
        assert window is not None
        print(f"scored on rows {window.row_off}.. (the validation window); nested: epochs chosen on rows "
              f"{window.row_off - args.inner}-{window.row_off - 1}", flush=True)
        scene = base.train[0]
        cut = [crop_above(scene.image, window.row_off, tmp / "cut-image.tif"),
               crop_above(scene.labels, window.row_off, tmp / "cut-labels.tif")]
    modes = MODES[-2:] if args.nested_only else MODES if nested_ok else MODES[:4]
    runs: list[dict] = []
    t_all = time.perf_counter()
    for seed in args.seeds:
        row: dict = {"seed": seed, "seconds": {}}
        histories = []
        for mode in () if args.nested_only else ("ema", "swa"):
            cfg = load_config(args.train_config, [f"output={tmp / f'{mode}-{seed}.safetensors'}", f"seed={seed}",
                                                  f"selection={mode}", *args.overrides], TrainConfig)
            t0 = time.perf_counter()
            result = train_model(cfg)
            row["seconds"][mode] = round(time.perf_counter() - t0, 1)
            histories.append([h["val_miou"] for h in result.history])
            row[mode] = result.selected_miou
            if mode == "ema":
                spec = read_model_spec(result.checkpoint)
                tiling = SegmentConfig(model=result.checkpoint, tile=cfg.validation.tile, stitch=cfg.validation.stitch)
                row["best"], row["best_epoch"] = result.best_miou, result.best_epoch
                row["last"] = model_metrics(TrainPaths.for_output(result.checkpoint).state, spec, val,
                                            tiling)["mean_iou"]
                row["history"] = result.history
        row["same_training"] = len(histories) < 2 or histories[0] == histories[1]
        if not nested_ok:
            runs.append(row)
            print(f"seed {seed}: " + ", ".join(f"{m} {row[m]:.4f}" for m in modes)
                  + f" (best epoch {row['best_epoch']}, same training: {row['same_training']}, {row['seconds']})",
                  flush=True)
            continue
        assert window is not None
        nested = load_config(args.train_config, [
            f"output={tmp / f'refit-{seed}.safetensors'}", f"seed={seed}", "refit=true",
            f"train=[{{image: {cut[0]}, labels: {cut[1]}}}]",
            f"validation.window={{row_off: {window.row_off - args.inner}, height: {args.inner}}}", *args.overrides,
        ], TrainConfig)
        t0 = time.perf_counter()
        refit = train_model(nested)
        row["seconds"]["nested refit (both runs)"] = round(time.perf_counter() - t0, 1)
        inner = holdout_path(refit.checkpoint)
        for name, ckpt in (("nested best", inner), ("nested refit", refit.checkpoint)):
            spec = read_model_spec(ckpt)
            tiling = SegmentConfig(model=ckpt, tile=nested.validation.tile, stitch=nested.validation.stitch)
            row[name] = model_metrics(ckpt, spec, val, tiling)["mean_iou"]
        row["nested_epochs"] = read_model_spec(refit.checkpoint).provenance["refit"]["epochs"]
        runs.append(row)
        print(f"seed {seed}: " + ", ".join(f"{m} {row[m]:.4f}" for m in modes)
              + f" (best epoch {row.get('best_epoch')}, nested epochs {row['nested_epochs']}, same training: "
              f"{row['same_training']}, {row['seconds']})", flush=True)

    print(f"\n{len(args.seeds)} seeds in {time.perf_counter() - t_all:.0f} s\n")
    print("| weights kept | chosen on the scored area? | mIoU (mean ± sd) | per seed |")
    print("| --- | --- | --- | --- |")
    summary = {}
    for m in modes:
        v = np.array([r[m] for r in runs])
        summary[m] = {"mean": v.mean(), "sd": sample_sd(v), "values": v.tolist()}
        print(f"| {m} | {'yes' if m == 'best' else 'no'} | {v.mean():.3f} ± {summary[m]['sd']:.3f} | "
              + ", ".join(f"{x:.3f}" for x in v) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"selection-{args.train_config.stem}{'-nested' if args.nested_only else ''}.json"
    out.write_text(json.dumps({"machine": machine(), "malloc": malloc, "config": str(args.train_config),
                               "overrides": args.overrides, "inner_rows": args.inner, "runs": runs,
                               "summary": summary}, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""What test-time augmentation buys and costs: `geoseg run` with `infer.tta` none, flips and d4.

Trains the training config once (or takes ``--model``), then segments the config's first training scene
with the real pipeline (tiling, overlap, blending) for each TTA mode, interleaved over rounds, and scores
each output with the evaluation stage against the labels of the validation rows only (every other row of
the reference is set to the map's nodata, so the scene's context is there and the score is on unseen rows).

    python benchmarks/bench_tta.py configs/train-nc-landsat7.yaml
    python benchmarks/bench_tta.py configs/train-nc-landsat7.yaml --model models/nc-landsat7.safetensors

Needs the real data under ../shared/data (see its README); exits with a message where it is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine  # noqa: E402

MODES = ("none", "flips", "d4")


def validation_reference(labels: Path, row_off: int, height: int | None, nodata: int, out: Path) -> Path:
    """A copy of ``labels`` keeping only the validation rows (the others become the map's nodata, else ``nodata``)."""
    import rasterio

    with rasterio.open(labels) as src:
        data, profile = src.read(1), src.profile
        nodata = int(src.nodata) if src.nodata is not None else nodata
    keep = np.zeros(data.shape, bool)
    keep[row_off : None if height is None else row_off + height] = True
    data[~keep] = nodata
    profile.update(nodata=nodata)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_config", type=Path)
    p.add_argument("--model", type=Path, help="a trained checkpoint (default: train the config, seed --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "auto"])
    args = p.parse_args()
    malloc = control_malloc(True)

    from geoseg.config import TrainConfig, load_config
    from geoseg.config.loader import validate
    from geoseg.config.pipeline import PipelineConfig
    from geoseg.device import cpu_has_bf16
    from geoseg.errors import GeosegError
    from geoseg.pipeline import run_pipeline
    from geoseg.train import train_model

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-tta-"))
    try:
        cfg = load_config(args.train_config, [f"output={tmp / 'model.safetensors'}", f"seed={args.seed}"],
                          TrainConfig)
    except GeosegError as exc:
        sys.exit(f"cannot run this benchmark: {exc} (the real data lives in ../shared/data; see its README)")
    print(f"machine: {machine()}, bf16 CPU: {cpu_has_bf16()}\nmalloc: {malloc}\nconfig: {args.train_config}, "
          f"precision {args.precision}, {args.rounds} rounds", flush=True)
    model = args.model
    if model is None:
        t0 = time.perf_counter()
        model = train_model(cfg).checkpoint
        print(f"trained {cfg.model.architecture}-{cfg.model.encoder} seed {args.seed} in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    scene = cfg.train[0]
    win = cfg.validation.window
    if win is None:
        sys.exit("cannot run this benchmark: the config's validation is not a window of its training scene")
    nodata = cfg.ignore_codes[0] if cfg.ignore_codes else 0
    reference = validation_reference(scene.labels, win.row_off, win.height, nodata, tmp / "reference.tif")
    tile = {"size": cfg.validation.tile.size, "overlap": cfg.validation.tile.overlap}

    runs: list[dict] = []
    for r in range(args.rounds):
        for mode in MODES:
            out = tmp / f"{mode}-{r}"
            pcfg = validate(PipelineConfig, {
                "input": str(scene.image), "model": str(model), "output_dir": str(out), "tile": tile,
                "infer": {"tta": mode, "precision": args.precision, "device": "cpu"},
                "stitch": {"blend": cfg.validation.stitch.blend}, "vectorize": {"enabled": False},
                "write": {"stac_item": False, "overviews": False},
                "evaluate": {"reference": str(reference), "ignore": list(cfg.ignore_codes)},
            }, "bench_tta", None)
            result = run_pipeline(pcfg)
            metrics = json.loads((out / "metrics.json").read_text())
            runs.append({"round": r, "tta": mode, "seconds": result.timings["tile_infer_stitch"],
                         "miou": metrics["mean_iou"], "oa": metrics.get("overall_accuracy")})
            print(f"  round {r} {mode:5s}: mIoU {runs[-1]['miou']:.4f}, tile+infer+stitch "
                  f"{runs[-1]['seconds']:.2f}s", flush=True)

    # The scene is small (527 x 300): the stage time above carries the run's fixed costs. The model's own
    # cost per tile, from the predictor the workers use, on 64 tiles of the validation tile size:
    from geoseg.fingerprint import model_digest
    from geoseg.segment.predict import ModelKey, Predictor

    pred = Predictor(ModelKey(str(model), model_digest(model), "cpu", "fp32", True))
    tiles = np.random.default_rng(0).normal(size=(64, len(cfg.bands), tile["size"], tile["size"])).astype(np.float32)
    per_tile: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            t0 = time.perf_counter()
            pred.predict(tiles, batch_size=16, tta=mode)
            per_tile[mode].append((time.perf_counter() - t0) / len(tiles) * 1000)
    forward = {m: statistics.median(v) for m, v in per_tile.items()}
    print("model cost per tile (ms, median): " + ", ".join(f"{m} {v:.2f}" for m, v in forward.items()))

    base = statistics.median(x["seconds"] for x in runs if x["tta"] == "none")
    print("\n| infer.tta | mIoU (validation rows) | tile+infer+stitch, median | cost | model per tile | cost |")
    print("| --- | --- | --- | --- | --- | --- |")
    summary = {}
    for mode in MODES:
        mine = [x for x in runs if x["tta"] == mode]
        sec = statistics.median(x["seconds"] for x in mine)
        summary[mode] = {"miou": mine[0]["miou"], "seconds": sec, "cost": sec / base,
                         "tile_ms": forward[mode], "tile_cost": forward[mode] / forward["none"]}
        print(f"| {mode} | {mine[0]['miou']:.3f} | {sec:.2f} s | {sec / base:.1f}x | {forward[mode]:.2f} ms | "
              f"{forward[mode] / forward['none']:.1f}x |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"tta-{args.train_config.stem}.json"
    dest.write_text(json.dumps({"machine": machine(), "malloc": malloc, "precision": args.precision,
                                "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()

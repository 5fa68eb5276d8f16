"""Accuracy and speed effect of bf16 autocast and channels-last on CPU, with the trained demo model.

    python3 dev.py demo                     # makes models/demo.safetensors and data/sample-test
    python benchmarks/bench_precision.py
    python benchmarks/bench_precision.py --model landsat.safetensors --scene ../shared/data/nc-landsat7/scene.tif \
        --labels reference.tif --name landsat

Runs the pipeline on the held-out sample scene with each setting on one warm cluster and reports: wall
time, agreement of the class ids with the fp32 run, and mIoU against the scene's reference map.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def main() -> None:
    import rasterio

    from geoseg.cluster import open_client
    from geoseg.config import PipelineConfig, validate
    from geoseg.pipeline import run_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models/demo.safetensors")
    p.add_argument("--scene", type=Path, default=ROOT / "data/sample-test/scene.tif")
    p.add_argument("--labels", type=Path, default=ROOT / "data/sample-test/labels.tif", help="reference map")
    p.add_argument("--name", default="demo", help="results/precision-NAME.json")
    args = p.parse_args()
    malloc = control_malloc(True)
    model, scene = args.model, args.scene
    for path in (model, scene, args.labels):
        if not path.exists():
            sys.exit(f"{path}: not found (`python3 dev.py demo` makes models/demo.safetensors and data/sample-test)")
    tmp = Path(tempfile.mkdtemp(prefix="geoseg-prec-"))
    print(f"machine: {machine()}\nmalloc: {malloc}\nmodel: {model} on {scene}")
    base = None
    rows = {}
    with open_client(validate(PipelineConfig, {"input": str(scene), "model": str(model),
                                               "output_dir": str(tmp)}, "b", None).cluster) as client:
        for rnd in range(2):  # first round warms the workers up
            for precision, cl in SETTINGS:
                name = f"{precision}{'+channels_last' if cl else ''}"
                cfg = validate(PipelineConfig, {
                    "input": str(scene), "model": str(model), "output_dir": str(tmp / name),
                    "overwrite": True, "infer": {"precision": precision, "channels_last": cl, "device": "cpu"},
                    "vectorize": {"enabled": False}, "evaluate": {"reference": str(args.labels)},
                }, "b", None)
                t0 = time.perf_counter()
                result = run_pipeline(cfg, client=client, progress=False)
                wall = time.perf_counter() - t0
                if rnd == 0:
                    continue
                with rasterio.open(result.landcover) as ds:
                    labels = ds.read(1)
                base = labels if base is None else base
                valid = labels != 255
                metrics = json.loads((tmp / name / "metrics.json").read_text())
                rows[name] = {"seconds": wall, "agreement_with_fp32": float((labels[valid] == base[valid]).mean()),
                              "mean_iou": metrics["mean_iou"], "overall_accuracy": metrics["overall_accuracy"]}
                print(f"{name:20s} {wall:6.2f}s  agreement with fp32 {rows[name]['agreement_with_fp32']:.5f}  "
                      f"mIoU {metrics['mean_iou']:.4f}  OA {metrics['overall_accuracy']:.4f}", flush=True)
    fp32 = rows["fp32"]["seconds"]
    for name, r in rows.items():
        print(f"{name:20s} speed-up x{fp32 / r['seconds']:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"precision-{args.name}.json").write_text(json.dumps({
        "machine": machine(), "malloc": malloc, "model": str(model), "scene": str(scene), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()

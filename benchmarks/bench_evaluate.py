"""Streaming confusion matrix vs one numpy bincount over whole arrays, in one run.

    python benchmarks/bench_evaluate.py --size 16384

Writes a prediction/reference pair of label rasters (window by window), then measures:
  geoseg  evaluate_iou (blocks of 2048 on Dask threads): MPix/s, peak RSS
  numpy   read both rasters whole + one np.bincount: MPix/s (bincount alone and with the reads), peak RSS
Each part runs in its own child process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, PeakRSS, control_malloc, machine  # noqa: E402

CLASSES = [{"id": i, "name": f"class{i}", "color": "#808080"} for i in range(1, 7)]


def make_pair(size: int) -> tuple[Path, Path]:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    out = RESULTS / "data" / f"labels-{size}"
    pred, ref = out / "pred.tif", out / "ref.tif"
    if pred.exists() and ref.exists():
        return pred, ref
    out.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "uint8", "nodata": 0,
               "crs": "EPSG:32631", "transform": from_origin(500000, 5000000, 10, 10), "tiled": True,
               "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    rng = np.random.default_rng(0)
    with rasterio.open(pred, "w", **profile) as p, rasterio.open(ref, "w", **profile) as r:
        p.update_tags(GEOSEG_CLASSES=json.dumps(CLASSES))
        for r0 in range(0, size, 2048):
            for c0 in range(0, size, 2048):
                w = Window(c0, r0, min(2048, size - c0), min(2048, size - r0))
                shape = (int(w.height), int(w.width))
                small = rng.integers(1, 7, size=(shape[0] // 32 + 1, shape[1] // 32 + 1), dtype=np.uint8)
                truth = np.kron(small, np.ones((32, 32), np.uint8))[: shape[0], : shape[1]]
                noisy = np.where(rng.random(shape) < 0.8, truth, rng.integers(0, 7, size=shape, dtype=np.uint8))
                r.write(truth, 1, window=w)
                p.write(noisy.astype(np.uint8), 1, window=w)
    return pred, ref


def run_geoseg(pred: str, ref: str, block: int) -> dict:
    from geoseg.config import EvaluateConfig
    from geoseg.evaluate import evaluate_iou

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        report = evaluate_iou(Path(pred), EvaluateConfig(reference=Path(ref), block=block)).to_dict()
        wall = time.perf_counter() - t0
    return {"seconds": wall, "peak_rss_gib": rss.peak / 2**30, "cm": report["confusion_matrix"]}


def run_numpy(pred: str, ref: str) -> dict:
    import numpy as np
    import rasterio

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        with rasterio.open(pred) as p, rasterio.open(ref) as r:
            a, b = p.read(1), r.read(1)
        t1 = time.perf_counter()
        keep = (a > 0) & (b > 0)
        cm = np.bincount(b[keep].astype(np.int64) * 7 + a[keep], minlength=49).reshape(7, 7)[1:, 1:]
        t2 = time.perf_counter()
    return {"seconds": t2 - t0, "bincount_seconds": t2 - t1, "read_seconds": t1 - t0,
            "peak_rss_gib": rss.peak / 2**30, "cm": cm.tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--block", type=int, default=2048)
    p.add_argument("--part", choices=["geoseg", "numpy"], help=argparse.SUPPRESS)
    p.add_argument("--pred", help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        res = run_geoseg(args.pred, args.ref, args.block) if args.part == "geoseg" else run_numpy(args.pred, args.ref)
        print(json.dumps(res))
        return
    malloc = control_malloc(True)
    pred, ref = make_pair(args.size)
    px = args.size**2
    print(f"machine: {machine()}\nmalloc: {malloc}\npair {args.size}x{args.size} uint8, 6 classes, block {args.block}")
    out = {}
    for part in ("numpy", "geoseg"):
        cmd = [sys.executable, __file__, "--part", part, "--pred", str(pred), "--ref", str(ref),
               "--block", str(args.block)]
        out[part] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert out["numpy"]["cm"] == out["geoseg"]["cm"], "confusion matrices differ"
    g, n = out["geoseg"], out["numpy"]
    print(f"numpy : read {n['read_seconds']:.1f}s + bincount {n['bincount_seconds']:.1f}s = {n['seconds']:.1f}s, "
          f"{px / n['seconds'] / 1e6:.0f} MPix/s ({px / n['bincount_seconds'] / 1e6:.0f} bincount alone), "
          f"peak RSS {n['peak_rss_gib']:.2f} GiB")
    print(f"geoseg: {g['seconds']:.1f}s, {px / g['seconds'] / 1e6:.0f} MPix/s, peak RSS {g['peak_rss_gib']:.2f} GiB")
    print(f"geoseg / numpy speed: {n['seconds'] / g['seconds']:.2f} (with reads), "
          f"{n['bincount_seconds'] / g['seconds']:.2f} (vs bincount alone); identical matrices")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for v in out.values():
        v.pop("cm")
    (RESULTS / f"evaluate-{args.size}.json").write_text(json.dumps({"machine": machine(), "malloc": malloc, **out},
                                                                   indent=2))


if __name__ == "__main__":
    main()

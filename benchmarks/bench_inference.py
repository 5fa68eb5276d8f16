"""Throughput and memory of `geoseg run` against the raw model and a hand-written rasterio loop.

One run, same machine, same model (Unet-resnet18, 4 bands, 6 classes, random weights: speed does not
depend on them), same tile grid and numerics:

  (a) raw forward pass on random batches of the tile size: the ceiling, MPix/s of tile pixels
  (b) geoseg run end to end (read, tile to Zarr, infer, stitch, write the COG) on a generated scene
  (c) a plain rasterio window loop with batching, as a user would write it by hand

Ratios: b/a (scene pixels), b/a corrected for the overlap's extra pixels (tile pixels inferred), b/c.
`--memory` runs the pipeline on growing scenes with a small model and reports peak RSS (all processes).

    python benchmarks/bench_inference.py                       # 2048^2, tile 512, overlap 64, fp32
    python benchmarks/bench_inference.py --precision bf16 --channels-last
    python benchmarks/bench_inference.py --memory 4096 16384
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, PeakRSS, control_malloc, machine, sample_scene  # noqa: E402


def make_model(path: Path, arch: str) -> Path:
    import torch

    from geoseg.models import ModelSpec, create_model, output_stride, save_checkpoint
    from geoseg.sample import BANDS, CLASSES

    kwargs = {"depth": 6, "width": 32} if arch == "fcn" else {}
    torch.manual_seed(0)
    model = create_model(arch, "resnet18" if arch != "fcn" else "none", 4, 6, **kwargs).eval()
    spec = ModelSpec(architecture=arch, encoder="resnet18" if arch != "fcn" else "none",
                     bands=[{"index": i + 1, "name": b} for i, b in enumerate(BANDS)], mean=[900.0] * 4,
                     std=[700.0] * 4, classes=CLASSES, tile_size=512, arch_kwargs=kwargs,
                     output_stride=output_stride(model))
    return save_checkpoint(path, model, spec)


def raw_forward(checkpoint: Path, tile: int, batch: int, precision: str, channels_last: bool, seconds: float) -> float:
    """(a): MPix/s of the bare model on random tiles, same threads and numerics as the pipeline."""
    import os

    import numpy as np
    import torch

    from geoseg.fingerprint import model_digest
    from geoseg.segment.predict import ModelKey, Predictor

    key = ModelKey(str(checkpoint), model_digest(checkpoint), "cpu", precision, channels_last)
    pred = Predictor(key)
    torch.set_num_threads(os.cpu_count() or 1)  # the model as the pipeline has it; all cores, as (c) uses
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 4, tile, tile)).astype(np.float32))
    x = x.contiguous(memory_format=pred.memory_format)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=pred.dtype or torch.float32,
                                                    enabled=pred.dtype is not None):
            pred.model(x)

    forward()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        forward()
        n += 1
    return n * batch * tile * tile / (time.perf_counter() - t0) / 1e6


def hand_loop(scene: Path, checkpoint: Path, out: Path, tile: int, overlap: int, batch: int, precision: str,
              channels_last: bool) -> float:
    """(c): what a user writes by hand: boundless windows with overlap, batches, centre crops, one GeoTIFF."""
    import os

    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from geoseg.fingerprint import model_digest
    from geoseg.segment.predict import ModelKey, Predictor

    pred = Predictor(ModelKey(str(checkpoint), model_digest(checkpoint), "cpu", precision, channels_last))
    halo, stride = overlap // 2, tile - overlap
    t0 = time.perf_counter()
    with rasterio.open(scene) as src:
        profile = {**src.profile, "count": 1, "dtype": "uint8", "nodata": 255, "tiled": True, "compress": "deflate"}
        with rasterio.open(out, "w", **profile) as dst:
            origins = [(r, c) for r in range(0, src.height, stride) for c in range(0, src.width, stride)]
            for s in range(0, len(origins), batch):
                group = origins[s : s + batch]
                tiles = []
                for r, c in group:
                    win = Window(c - halo, r - halo, tile, tile)
                    data = src.read(window=win, boundless=True, fill_value=0)
                    valid = (src.read_masks(1, window=win, boundless=True) > 0)
                    tiles.append(pred.normalize(data, valid))
                probs = pred.predict(np.stack(tiles), batch, threads=os.cpu_count())
                for (r, c), p in zip(group, probs):
                    h, w = min(stride, src.height - r), min(stride, src.width - c)
                    labels = (p.argmax(0) + 1).astype(np.uint8)[halo : halo + h, halo : halo + w]
                    dst.write(labels, 1, window=Window(c, r, w, h))
    return time.perf_counter() - t0


def pipeline_config(scene: Path, checkpoint: Path, out: Path, tile: int, overlap: int, batch: int, precision: str,
                    channels_last: bool, workers: int, threads: int, chunk_tiles: int | None = None):  # noqa: ANN201
    from geoseg.config import PipelineConfig, validate

    return validate(PipelineConfig, {
        "input": str(scene), "model": str(checkpoint), "output_dir": str(out), "overwrite": True,
        "tile": {"size": tile, "overlap": overlap, **({"chunk_tiles": chunk_tiles} if chunk_tiles else {})},
        "infer": {"batch_size": batch, "precision": precision, "channels_last": channels_last, "device": "cpu"},
        "cluster": {"n_workers": workers, "threads_per_worker": threads},
        "vectorize": {"enabled": False},  # (b) is read, tile, infer, stitch, write: what (c) does too
    }, "bench", None)


def geoseg_run(cfg, client) -> tuple[float, dict, int]:  # noqa: ANN001
    """(b): run_pipeline end to end on a running cluster."""
    from geoseg.pipeline import run_pipeline

    t0 = time.perf_counter()
    result = run_pipeline(cfg, client=client, progress=False)
    return time.perf_counter() - t0, {**result.timings, **result.stats["task_seconds"]}, result.stats["tiles_inferred"]


def throughput(args: argparse.Namespace, malloc: str) -> dict:
    import statistics

    from geoseg.cluster import open_client

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-bench-"))
    ckpt = make_model(tmp / "model.safetensors", args.arch)
    scene = sample_scene(args.size)
    px = args.size * args.size
    print(f"machine: {machine()}\nmalloc: {malloc}\nmodel: {args.arch}-resnet18, 4 bands, 6 classes, "
          f"precision {args.precision}, channels_last {args.channels_last}\nscene {args.size}x{args.size}, "
          f"tile {args.tile}, overlap {args.overlap}, batch {args.batch}; {args.rounds} rounds of a, b, c "
          "(interleaved, medians: this VM's speed drifts)", flush=True)
    cfg = pipeline_config(scene, ckpt, tmp / "b", args.tile, args.overlap, args.batch, args.precision,
                          args.channels_last, args.workers, args.threads, args.chunk_tiles)
    a_runs, b_runs, c_runs = [], [], []
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        with open_client(cfg.cluster) as client:
            geoseg_run(cfg, client)  # cold: worker start, torch import, model load, then the run
            cold = time.perf_counter() - t0
            for r in range(args.rounds):
                a_runs.append(raw_forward(ckpt, args.tile, args.batch, args.precision, args.channels_last,
                                          args.raw_seconds))
                wall, stages, tiles = geoseg_run(cfg, client)
                b_runs.append(wall)
                c_runs.append(hand_loop(scene, ckpt, tmp / "c.tif", args.tile, args.overlap, args.batch,
                                        args.precision, args.channels_last))
                print(f"  round {r + 1}: a {a_runs[-1]:.3f} MPix/s, b {wall:.2f}s, c {c_runs[-1]:.2f}s {stages}",
                      flush=True)
    a, b_wall, c_wall = statistics.median(a_runs), statistics.median(b_runs), statistics.median(c_runs)
    b, c = px / b_wall / 1e6, px / c_wall / 1e6
    b_tiles = tiles * args.tile**2 / b_wall / 1e6
    print(f"(a) raw forward: {a:.3f} MPix/s (tile pixels)")
    print(f"(b) geoseg run: {b_wall:.2f}s, {b:.3f} MPix/s scene, {b_tiles:.3f} MPix/s tile pixels ({tiles} tiles of "
          f"{args.tile}: {tiles * args.tile**2 / px:.2f}x the scene); peak RSS (client + workers) "
          f"{rss.peak / 2**30:.2f} GiB")
    print(f"    cold (fresh cluster: worker start, torch import, model load, then the run): {cold:.1f}s, "
          f"{px / cold / 1e6:.3f} MPix/s scene")
    print(f"(c) rasterio loop: {c_wall:.2f}s, {c:.3f} MPix/s scene")
    print(f"b/a = {b / a:.3f}   b/a corrected for overlap = {b_tiles / a:.3f}   b/c = {b / c:.3f}")
    return {"machine": machine(), "malloc": malloc, "arch": args.arch, "precision": args.precision,
            "channels_last": args.channels_last, "size": args.size, "tile": args.tile, "overlap": args.overlap,
            "batch": args.batch, "workers": args.workers, "threads": args.threads, "rounds": args.rounds,
            "a_raw_mpix_s": a, "b_geoseg_mpix_s": b, "b_tile_mpix_s": b_tiles, "c_loop_mpix_s": c,
            "b_over_a": b / a, "b_over_a_overlap_corrected": b_tiles / a, "b_over_c": b / c,
            "peak_rss_gib": rss.peak / 2**30, "b_cold_s": cold, "runs": {"a": a_runs, "b": b_runs, "c": c_runs}}


def memory(args: argparse.Namespace, malloc: str) -> dict:
    """Peak RSS of `geoseg run` (the CLI in a child process: client, scheduler, nanny, worker) per scene size."""
    import subprocess

    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-bench-"))
    ckpt = args.checkpoint.resolve() if args.checkpoint else make_model(tmp / "model.safetensors", args.arch)
    model = args.checkpoint or f"{args.arch}-{'resnet18' if args.arch != 'fcn' else 'depth 6 width 32'}, random weights"
    print(f"machine: {machine()}\nmalloc: {malloc}\nmodel: {model}, tile {args.tile}, "
          f"overlap {args.overlap}, batch {args.batch}, {args.workers} worker x {args.threads} threads; "
          "peak RSS summed over every process of the run", flush=True)
    rows = {}
    for size in args.memory:
        scene = sample_scene(size)
        cfg = tmp / f"m{size}.yaml"
        cfg.write_text(yaml.safe_dump({
            "input": str(scene), "model": str(ckpt), "output_dir": str(tmp / f"m{size}"),
            "tile": {"size": args.tile, "overlap": args.overlap},
            "infer": {"batch_size": args.batch, "precision": args.precision, "device": "cpu"},
            "cluster": {"n_workers": args.workers, "threads_per_worker": args.threads},
            "vectorize": {"enabled": False},
        }))
        with PeakRSS(children_only=True) as peak:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "geoseg", "-q", "run", str(cfg)], check=True)
            wall = time.perf_counter() - t0
        manifest = json.loads((tmp / f"m{size}" / "run.json").read_text())
        rss = peak.peak / 2**30
        processes = peak.roles()
        rows[size] = {"peak_rss_gib": rss, "seconds": wall, "mpix_s": size * size / wall / 1e6,
                      "processes_peak_rss_gib": processes, "stages": manifest["timings_s"]}
        each = ", ".join(f"{k} {v:.2f}" for k, v in processes.items())
        print(f"{size}x{size}: peak RSS {rss:.2f} GiB ({each}), {wall:.0f}s "
              f"({size * size / wall / 1e6:.2f} MPix/s incl. start)", flush=True)
    return {"machine": machine(), "malloc": malloc, "model": str(model), "memory": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--arch", default="unet")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--chunk-tiles", type=int, default=None, help="tiles per chunk side (default: geoseg's)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="task threads per worker")
    p.add_argument("--raw-seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory", type=int, nargs="*", help="scene sizes for the memory run")
    p.add_argument("--checkpoint", type=Path, default=None, help="memory run: this checkpoint, not --arch's")
    p.add_argument("--no-malloc-tuning", action="store_true", help="measure with glibc's default thresholds")
    args = p.parse_args()
    malloc = control_malloc(not args.no_malloc_tuning)
    result = memory(args, malloc) if args.memory else throughput(args, malloc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.memory:
        name = f"memory-{args.checkpoint.stem if args.checkpoint else args.arch}-{args.precision}"
    else:
        name = f"inference-{args.arch}-{args.precision}{'-cl' if args.channels_last else ''}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

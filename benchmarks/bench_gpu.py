"""The shipped pipeline on a GPU: throughput per GPU against the raw forward, and what feeds it.

For a machine with CUDA (one call of the device tool, DEVELOPERS.md). One run, same model (Unet-resnet18,
4 bands, 6 classes, random weights: speed does not depend on them), tile 512, overlap 64:

  (a) the raw forward in bf16 autocast + channels-last on random batches on the GPU: the ceiling;
  (b) ``geoseg run`` end to end on a generated scene (read, tile to Zarr, infer on the GPU, stitch,
      write the COGs), the GPU worker with 1, 2 and 4 task threads: one inference slot (GPU=1), the other
      threads reading and decoding tiles and stitching meanwhile;
  (c) the same pipeline in fp32, for the agreement of bf16 with fp32 (pixels).

Ratios b/a; scene MPix/s; GPU busy share (torch.cuda utilisation is not sampled: (a) x time / wall).

    .venv/bin/python benchmarks/bench_gpu.py --size 8192 --batch 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine, sample_scene  # noqa: E402
from bench_inference import make_model  # noqa: E402


def raw_forward(checkpoint: Path, tile: int, batch: int, seconds: float) -> float:
    """(a): MPix/s of the bare model on the GPU in bf16 autocast, channels-last, batches already there."""
    import torch

    from geoseg.models import build_model, load_checkpoint

    spec, state = load_checkpoint(checkpoint)
    model = build_model(spec, state).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 4, tile, tile, device="cuda").to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x).float().softmax(1)
            n += 1
        torch.cuda.synchronize()
    return n * batch * tile * tile / 1e6 / (time.perf_counter() - t0)


def pipeline(scene: Path, checkpoint: Path, out: Path, threads: int, batch: int, precision: str) -> tuple[float, Path]:
    """(b)/(c): seconds of ``run_pipeline`` on a one-GPU LocalCluster whose worker has ``threads`` threads."""
    from distributed import Client, LocalCluster

    from geoseg.config import validate
    from geoseg.config.pipeline import PipelineConfig
    from geoseg.pipeline import run_pipeline
    from geoseg.workerenv import INFER

    cfg = validate(PipelineConfig, {
        "input": str(scene), "model": str(checkpoint), "output_dir": str(out),
        "tile": {"size": 512, "overlap": 64, "chunk_tiles": 3},
        "infer": {"device": "cuda", "precision": precision, "batch_size": batch},
        "vectorize": {"enabled": False}, "write": {"stac_item": False}}, "bench", None)
    with LocalCluster(n_workers=1, threads_per_worker=threads, processes=True, dashboard_address=None,
                      resources={"GPU": 1, INFER: 1}) as cluster, Client(cluster) as c:
        t0 = time.perf_counter()
        result = run_pipeline(cfg, client=c, progress=False)
        return time.perf_counter() - t0, result.landcover


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", default="1,2,4", help="task threads of the GPU worker, one run each")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    print(f"malloc: {control_malloc(True)}")
    import numpy as np
    import rasterio
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; run it on a GPU machine")
    print(f"machine: {machine()}; GPU {torch.cuda.get_device_name(0)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    checkpoint = make_model(work / "unet.safetensors", "unet")
    scene = sample_scene(args.size)
    mpix = args.size**2 / 1e6
    raw = raw_forward(checkpoint, 512, args.batch, args.seconds)
    print(f"(a) raw forward bf16: {raw:.1f} MPix/s of tile pixels", flush=True)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        seconds, lc = pipeline(scene, checkpoint, work / f"bf16-{threads}", threads, args.batch, "bf16")
        rows.append({"precision": "bf16", "threads": threads, "seconds": round(seconds, 2),
                     "mpix_per_s": round(mpix / seconds, 2), "vs_raw": round(mpix / seconds / raw, 3)})
        print(json.dumps(rows[-1]), flush=True)
    seconds, fp32 = pipeline(scene, checkpoint, work / "fp32", max(int(t) for t in args.threads.split(",")),
                             args.batch, "fp32")
    with rasterio.open(lc) as a, rasterio.open(fp32) as b:
        agreement = float(np.mean(a.read(1) == b.read(1)))
    rows.append({"precision": "fp32", "seconds": round(seconds, 2), "mpix_per_s": round(mpix / seconds, 2),
                 "bf16_pixel_agreement": round(agreement, 5)})
    print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps({"machine": machine(), "gpu": torch.cuda.get_device_name(0),
                                                  "size": args.size, "raw_mpix_per_s": round(raw, 1),
                                                  "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""geoseg itself, measured like the peers: the cluster started and the model loaded, then a timed run.

Runs ``run_pipeline`` twice on one warm cluster (the first loads the model on the worker, as the peers'
scripts load theirs before their clock starts) and reports the second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scene", required=True)
    p.add_argument("--checkpoint", required=True, help="geoseg checkpoint of the same weights")
    p.add_argument("--out", required=True)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--memory-format", choices=["auto", "nchw", "channels-last"], default="auto",
                   help="auto: geoseg's default (channels-last)")
    p.add_argument("--threads-per-worker", type=int, default=2)
    p.add_argument("--infer-per-worker", type=int, default=None, help="default: geoseg's")
    p.add_argument("--chunk-tiles", type=int, default=3)
    args = p.parse_args()

    from geoseg.cluster import open_client
    from geoseg.config import PipelineConfig, validate
    from geoseg.pipeline import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="geoseg-peer-"))
    cfg = validate(PipelineConfig, {
        "input": args.scene, "model": args.checkpoint, "output_dir": str(work), "overwrite": True,
        "tile": {"size": args.tile, "overlap": args.overlap, "chunk_tiles": args.chunk_tiles},
        "infer": {"batch_size": args.batch, "precision": args.precision, "device": "cpu",
                  **({} if args.memory_format == "auto" else {"channels_last": args.memory_format != "nchw"})},
        "cluster": {"threads_per_worker": args.threads_per_worker,
                    **({"infer_per_worker": args.infer_per_worker} if args.infer_per_worker else {})},
        "vectorize": {"enabled": False}, "write": {"stac_item": False},
    }, "bench", None)
    with open_client(cfg.cluster) as client:
        run_pipeline(cfg, client=client, progress=False)  # warm: worker up, model loaded
        t0 = time.perf_counter()
        result = run_pipeline(cfg, client=client, progress=False)
        seconds = time.perf_counter() - t0
    Path(args.out).write_bytes(result.landcover.read_bytes())
    print(json.dumps({"seconds": seconds, "tiles": result.stats["tiles_inferred"], "stages": result.timings,
                      "task_seconds": result.stats["task_seconds"]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())

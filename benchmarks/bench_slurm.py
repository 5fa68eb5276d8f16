"""A batch of scenes on a real SLURM (workers as jobs) against the local backend, interleaved.

Starts the tests' private single-node SLURM (tests/private_slurm.py; root, Debian's packages, installed when
missing) and reports how long that takes, then runs the same batch with ``cluster.backend: local`` (one
worker process, ``--cores`` threads) and ``cluster.backend: slurm`` (``--cores`` one-core worker jobs), in
alternation, each into a fresh folder, and checks that both write the same land cover.

    sudo .venv/bin/python benchmarks/bench_slurm.py --scenes 10 --size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
import yaml  # noqa: E402
from _common import machine  # noqa: E402

from geoseg.workerenv import MALLOC_ENV  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=10)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=2, help="cores for each backend (local threads, SLURM jobs)")
    p.add_argument("--model", default=str(ROOT / "models" / "demo.safetensors"))
    args = p.parse_args()

    from geoseg.sample import make_sample
    from tests.private_slurm import PrivateSlurm

    work = Path(tempfile.mkdtemp(prefix="geoseg-bench-slurm-"))
    os.environ.update(MALLOC_ENV)
    slurm = PrivateSlurm(work / "slurm")
    slurm.start()
    os.environ.update(slurm.env)
    print(f"machine: {machine()}", flush=True)
    print(f"private SLURM up in {slurm.started_s:.1f}s ({slurm.cpus} CPUs, {slurm.memory_mb} MB)", flush=True)
    try:
        incoming = work / "in"
        for k in range(args.scenes):
            make_sample(incoming / f"s{k:02d}", args.size, seed=100 + k)
        listing = work / "scenes.txt"
        listing.write_text("".join(f"{incoming / f's{k:02d}' / 'scene.tif'}\n" for k in range(args.scenes)))
        model = Path(args.model)
        if not model.exists():
            from tests.conftest import make_checkpoint

            model = make_checkpoint(work / "unet.safetensors", architecture="unet", encoder="resnet18",
                                    arch_kwargs={}, tile_size=512)
        common = {"model": str(model), "tile": {"size": 512, "overlap": 64}, "vectorize": {"enabled": True},
                  "write": {"stac_item": True}}
        backends = {
            "local": {"backend": "local", "n_workers": 1, "threads_per_worker": args.cores},
            "slurm": {"backend": "slurm", "worker_timeout_s": 300,
                      "jobqueue": {"cores": 1, "memory": "4GiB", "processes": 1, "walltime": "01:00:00",
                                   "maximum_jobs": args.cores, "max_pending_jobs": args.cores}},
        }
        results: dict[str, list[float]] = {b: [] for b in backends}
        outputs: dict[str, Path] = {}
        for r in range(args.rounds):
            for name, cluster in backends.items():
                out = work / f"{name}-{r}"
                cfg = work / f"{name}.yaml"
                cfg.write_text(yaml.safe_dump({**common, "output_dir": str(out), "cluster": cluster}))
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "geoseg", "batch", str(cfg), "--scenes", str(listing)],
                                      capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if done.returncode:
                    raise SystemExit(f"{name} round {r}: exit {done.returncode}\n{done.stderr[-3000:]}")
                results[name].append(seconds)
                outputs[name] = out
                jobs = done.stderr.count("submitted SLURM job")
                print(f"  round {r + 1} {name}: {seconds:.1f}s for {args.scenes} scenes"
                      + (f" ({jobs} worker jobs)" if jobs else ""), flush=True)
        # the batch names each scene's folder (scene, scene-2, ... for files all called scene.tif)
        found = {b: sorted(p.relative_to(outputs[b]) for p in outputs[b].glob("*/landcover.tif")) for b in outputs}
        same = len(found["local"]) == args.scenes and found["local"] == found["slurm"] and all(
            np.array_equal(_read(outputs["local"] / f), _read(outputs["slurm"] / f)) for f in found["local"])
        summary = {b: min(v) for b, v in results.items()}
        print(f"\n{args.scenes} scenes of {args.size}^2, {args.cores} cores each way (best of {args.rounds}):")
        for b, s in summary.items():
            print(f"  {b:6s} {s:7.1f}s  {args.scenes / s * 60:5.1f} scenes/min  {s / summary['local']:.2f}x local time")
        extra = (summary["slurm"] - summary["local"]) / args.scenes
        print(f"  SLURM's extra time per scene: {extra:.2f}s")
        print(f"  identical land cover: {same}")
        report = {"machine": machine(), "fixture_s": slurm.started_s, "extra_s_per_scene": extra,
                  "scenes": args.scenes, "size": args.size, "cores": args.cores,
                  "seconds": results, "identical": same}
        dest = ROOT / "benchmarks" / "results"
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "slurm.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        slurm.stop()


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


if __name__ == "__main__":
    main()

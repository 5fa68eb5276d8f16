"""geoseg against a competent hand loop and the peers themselves, in one interleaved run.

Every system segments the same synthetic scene with the same network and weights (Unet-resnet18, 4 bands,
6 classes, random weights: speed does not depend on them), the same normalisation, tile and overlap, on the
CPU, each in its own process with the same allocator settings (glibc's MALLOC_* thresholds and
MALLOC_ARENA_MAX=1, set for every process) and its clock started after its model is loaded:

  raw     the bare forward pass on random batches: the ceiling (tile pixels per second)
  geoseg  `run_pipeline` on a warm cluster (fp32; and `auto`: bf16 + channels_last, what the precision
          guard picks on an AMX CPU for models that pass it)
  loop    a competent rasterio loop (batch 4, all cores, centre crops)
  geoai   `geoai.inference.predict_geotiff`          (own virtual environment)
  torchgeo  RasterDataset + GridGeoSampler + stitching (own virtual environment)
  toolbelt  pytorch-toolbelt ImageSlicer/TileMerger  (own virtual environment)

Peers are installed on first use into benchmarks/results/venvs/<name> (they conflict with geoseg's pins),
with the same torch and segmentation-models-pytorch as geoseg's environment. Reported per system: scene
MPix/s (median of the rounds), tiles inferred, the ratio of its tile-pixel rate to the raw forward, the
ratio to the best peer, peak RSS of its process tree, and the share of pixels whose class equals geoseg
fp32's.

    python benchmarks/bench_peers.py                       # 2048^2, 3 rounds, every system
    python benchmarks/bench_peers.py --checkpoint models/demo.safetensors     # the trained demo model
    python benchmarks/bench_peers.py --size 4096 --systems raw geoseg loop geoai
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, PeakRSS, control_malloc, machine, sample_scene  # noqa: E402

PEERS = Path(__file__).resolve().parent / "peers"
VENVS = RESULTS / "venvs"
#: Packages of each peer's environment, beside the torch and smp geoseg's environment has.
PEER_PACKAGES = {
    "geoai": ["geoai-py"],
    "torchgeo": ["torchgeo", "requests"],  # torchgeo 0.8 imports requests without declaring it
    "toolbelt": ["pytorch-toolbelt"],
}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def peer_python(name: str) -> Path:
    """The interpreter of peer ``name``'s environment, made on first use (then cached)."""
    if name not in PEER_PACKAGES:
        return Path(sys.executable)
    venv = VENVS / name
    py = venv / "bin" / "python"
    marker = venv / ".installed"
    pins = [f"torch=={_version('torch').split('+')[0]}", f"torchvision=={_version('torchvision').split('+')[0]}",
            f"segmentation-models-pytorch=={_version('segmentation-models-pytorch')}", "safetensors", "rasterio"]
    want = json.dumps(pins + PEER_PACKAGES[name])
    if marker.exists() and marker.read_text() == want:
        return py
    t0 = time.perf_counter()
    print(f"  installing {name} into {venv} (first use; torch is large)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins,
                    *PEER_PACKAGES[name]], check=True)
    marker.write_text(want)
    print(f"  {name} ready in {time.perf_counter() - t0:.0f}s", flush=True)
    return py


def make_model(folder: Path, checkpoint: Path | None = None) -> tuple[Path, Path, Path]:
    """(geoseg checkpoint, plain state dict, meta JSON): ``checkpoint``'s, or a random-weight Unet-resnet18."""
    import torch
    from safetensors.torch import save_file

    from geoseg.models import ModelSpec, build_model, create_model, load_checkpoint, output_stride, save_checkpoint
    from geoseg.registry import ARCHITECTURES
    from geoseg.sample import BANDS, CLASSES

    if checkpoint is not None:
        spec, state = load_checkpoint(checkpoint)
        model, ckpt = build_model(spec, state), checkpoint
    else:
        torch.manual_seed(0)
        model = create_model("unet", "resnet18", 4, 6).eval()
        spec = ModelSpec(architecture="unet", encoder="resnet18", bands=[{"index": i + 1, "name": b}
                         for i, b in enumerate(BANDS)], mean=[900.0] * 4, std=[700.0] * 4, classes=CLASSES,
                         tile_size=512, output_stride=output_stride(model))
        ckpt = save_checkpoint(folder / "model.safetensors", model, spec)
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"smp_class": ARCHITECTURES[spec.architecture], "encoder": spec.encoder,
                                "kwargs": spec.arch_kwargs, "bands": [b.index for b in spec.bands],
                                "mean": list(spec.mean), "std": list(spec.std), "class_ids": spec.classes.ids}))
    return ckpt, weights, meta


def raw_forward(ckpt: Path, tile: int, batch: int, precision: str, channels_last: bool, seconds: float) -> float:
    """Tile MPix/s of the bare model on random batches, all cores."""
    import numpy as np
    import torch

    from geoseg.fingerprint import model_digest
    from geoseg.segment.predict import ModelKey, Predictor

    pred = Predictor(ModelKey(str(ckpt), model_digest(ckpt), "cpu", precision, channels_last))
    bands = pred.spec.in_channels
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, bands, tile, tile)).astype(np.float32))
    x = x.contiguous(memory_format=pred.memory_format)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=pred.dtype or torch.float32,
                                                    enabled=pred.dtype is not None):
            pred.model(x)

    forward()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        forward()
        n += 1
    return n * batch * tile * tile / (time.perf_counter() - t0) / 1e6


def run_system(name: str, args: argparse.Namespace, files: dict[str, Path], out: Path) -> dict:
    """One timed run of a system in its own process; its report, peak RSS and load average."""
    common = ["--scene", str(files["scene"]), "--out", str(out), "--tile", str(args.tile),
              "--overlap", str(args.overlap), "--batch", str(args.batch)]
    if name.startswith("geoseg"):
        cmd = [sys.executable, str(PEERS / "peer_geoseg.py"), *common, "--checkpoint", str(files["ckpt"])]
        if name == "geoseg-auto":
            # what `precision: auto` picks for a model that passed the bf16 guard: bf16 only on a bf16-native CPU
            from geoseg.device import cpu_has_bf16

            cmd += ["--precision", "bf16" if cpu_has_bf16() else "fp32"]
        elif name == "geoseg-nchw":  # fp32 in the peers' memory format
            cmd += ["--memory-format", "nchw"]
        elif name == "geoseg-1x2":  # one inference task per worker with all its cores
            cmd += ["--infer-per-worker", "1"]
        elif name == "geoseg-first-wave":  # the first wave's defaults: 2 x 1 threads, batch 2, NCHW
            cmd += ["--infer-per-worker", "2", "--batch", "2", "--memory-format", "nchw"]
    else:
        py = peer_python(name)
        cmd = [str(py), str(PEERS / f"peer_{name}.py"), *common, "--weights", str(files["weights"]),
               "--meta", str(files["meta"])]
    load = os.getloadavg()[0]
    with PeakRSS(children_only=True) as rss:
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {**report, "peak_rss_gib": rss.peak / 2**30, "load": load}


def agreement(a: Path, b: Path, valid) -> float:  # noqa: ANN001
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        return float((x.read(1) == y.read(1))[valid].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a trained geoseg checkpoint (Unet) instead of random weights: class agreement means more")
    p.add_argument("--raw-seconds", type=float, default=6.0)
    p.add_argument("--systems", nargs="+", default=["raw", "geoseg", "geoseg-auto", "loop", "geoai", "torchgeo",
                                                    "toolbelt"])
    args = p.parse_args()
    malloc = control_malloc(True)

    import numpy as np
    import rasterio

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-peers-"))
    ckpt, weights, meta = make_model(tmp, args.checkpoint)
    scene = sample_scene(args.size)
    files = {"scene": scene, "ckpt": ckpt, "weights": weights, "meta": meta}
    systems = ["geoseg" if s == "geoseg-fp32" else s for s in args.systems]
    for name in systems:
        if name in PEER_PACKAGES:
            peer_python(name)  # installs before any clock runs
    px = args.size * args.size
    model_name = str(args.checkpoint) if args.checkpoint else "unet-resnet18 (random weights), 4 bands, 6 classes"
    print(f"machine: {machine()}\nmalloc: {malloc}\nmodel: {model_name}\n"
          f"scene {args.size}x{args.size}, tile {args.tile}, overlap {args.overlap}, batch {args.batch}; "
          f"{args.rounds} rounds, systems interleaved: {', '.join(systems)}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    raw: list[float] = []
    raw_bf16: list[float] = []
    for r in range(args.rounds):
        for name in systems:
            if name == "raw":
                raw.append(raw_forward(ckpt, args.tile, args.batch, "fp32", False, args.raw_seconds))
                if "geoseg-auto" in systems:
                    from geoseg.device import cpu_has_bf16

                    raw_bf16.append(raw_forward(ckpt, args.tile, args.batch, "bf16" if cpu_has_bf16() else "fp32",
                                                True, args.raw_seconds))
                print(f"  round {r + 1} raw: {raw[-1]:.3f} MPix/s fp32" +
                      (f", {raw_bf16[-1]:.3f} auto precision + channels_last" if raw_bf16 else ""), flush=True)
                continue
            out = tmp / f"{name}-{r}.tif"
            rec = run_system(name, args, files, out)
            rec["output"] = str(out)
            runs[name].append(rec)
            print(f"  round {r + 1} {name}: {rec['seconds']:.2f}s, {px / rec['seconds'] / 1e6:.3f} MPix/s, "
                  f"{rec['tiles']} tiles, peak RSS {rec['peak_rss_gib']:.2f} GiB, load {rec['load']:.2f}", flush=True)
    with rasterio.open(scene) as src:
        valid = src.read_masks(1) > 0
    reference = runs["geoseg"][0]["output"] if runs.get("geoseg") else None
    rows = {}
    for name, recs in runs.items():
        if not recs:
            continue
        seconds = statistics.median(r["seconds"] for r in recs)
        tiles = recs[0]["tiles"]
        rows[name] = {"mpix_s": px / seconds / 1e6, "seconds": seconds, "tiles": tiles,
                      "tile_mpix_s": tiles * args.tile**2 / seconds / 1e6,
                      "peak_rss_gib": max(r["peak_rss_gib"] for r in recs),
                      "agreement": agreement(Path(recs[0]["output"]), Path(reference), valid) if reference else None,
                      "runs": recs}
    peers = [n for n in rows if not n.startswith("geoseg")]
    best = max(peers, key=lambda n: rows[n]["mpix_s"]) if peers else None
    a = statistics.median(raw) if raw else None
    a16 = statistics.median(raw_bf16) if raw_bf16 else None
    if a:
        print(f"\nraw forward: {a:.3f} MPix/s of tile pixels (fp32)" + (f", {a16:.3f} (bf16+channels_last)" if a16
                                                                        else ""))
    print(f"{'system':<12} {'MPix/s':>7} {'tiles':>6} {'/raw':>6} {'/best peer':>11} {'RSS GiB':>8} {'= geoseg':>9}")
    for name, row in rows.items():
        ceiling = a16 if name == "geoseg-auto" and a16 else a
        vs_raw = row["tile_mpix_s"] / ceiling if ceiling else float("nan")
        vs_best = row["mpix_s"] / rows[best]["mpix_s"] if best else float("nan")
        row.update(vs_raw=vs_raw, vs_best_peer=vs_best)
        agree = f"{100 * row['agreement']:.2f}%" if row["agreement"] is not None else "-"
        print(f"{name:<12} {row['mpix_s']:>7.3f} {row['tiles']:>6} {vs_raw:>6.2f} {vs_best:>11.2f} "
              f"{row['peak_rss_gib']:>8.2f} {agree:>9}")
    if best:
        print(f"best peer: {best}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    weights = "trained" if args.checkpoint else "random"
    (RESULTS / f"peers-{args.size}-{weights}.json").write_text(json.dumps({
        "machine": machine(), "malloc": malloc, "model": model_name, "rounds": args.rounds,
        "size": args.size, "tile": args.tile, "overlap": args.overlap,
        "batch": args.batch, "raw_fp32": a, "raw_bf16_cl": a16, "best_peer": best, "systems": rows}, indent=2,
        default=str))
    del np


if __name__ == "__main__":
    main()

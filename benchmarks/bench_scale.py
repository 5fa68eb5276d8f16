"""A night of many scenes on many "GPUs", simulated: what the scheduler and the one client cost per scene.

A real ``dask scheduler`` and ``--workers`` real ``dask worker`` processes on this machine; each worker
has one inference slot (``infer=1``, like a GPU worker) whose forward pass is a stand-in that sleeps
``--infer-ms`` per tile and returns plausible class scores (``benchmarks/_standin.py``); everything else
(reading, tiling into Zarr, blending, stitching, the COGs, vectorizing, the manifests) is geoseg's own. A
batch of ``--scenes`` small scenes and then one of ``--large`` large scenes run through ``geoseg batch``
(``run_batch``, backend ``address``) once with the outputs written by the client (``write.on_workers:
false``, the path before this change) and once on the workers, on the same warm cluster. Measured:

- scheduler CPU per task and tasks per second (the scheduler's process CPU; tasks counted by a plugin);
- client CPU and RSS per scene (this process, which runs the batch), small and large scenes;
- from a scene's last inference to its publication (run.json), median and 95th percentile;
- idle time per inference slot between the first and the last inference of the batch.

    .venv/bin/python benchmarks/bench_scale.py --scenes 1000 --large 3 --workers 8

The results go to ``benchmarks/results/scale.json``; docs/scale.md extrapolates them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from distributed import Client, SchedulerPlugin  # noqa: E402

from benchmarks._common import MALLOC, RESULTS, control_malloc, machine  # noqa: E402
from geoseg.workerenv import WORKER_ENV  # noqa: E402


class Record(SchedulerPlugin):
    """Every finished task's key, worker and compute interval (the built-in task stream keeps only 1000)."""

    name = "bench-scale"

    def __init__(self) -> None:
        self.done: list[tuple[str, str, float, float]] = []

    def transition(self, key, start, finish, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        if finish != "memory" or "worker" not in kwargs:
            return
        for ss in kwargs.get("startstops", ()):
            if ss.get("action") == "compute":
                self.done.append((str(key), str(kwargs["worker"]), ss["start"], ss["stop"]))


def records(dask_scheduler) -> list:  # noqa: ANN001
    plugin = dask_scheduler.plugins["bench-scale"]
    out, plugin.done = plugin.done, []
    return out


def make_scenes(folder: Path, n: int, size: int, seed0: int = 0) -> list[Path]:
    from geoseg.sample import make_sample

    paths = []
    for k in range(n):
        out = folder / f"s{size}-{seed0 + k:05d}"
        if not (out / "scene.tif").exists():
            make_sample(out, size, seed0 + k, block=min(size, 1024))
        paths.append(out / "scene.tif")
    return paths


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """CPU seconds of process ``pid`` (and, with ``tree``, of all its descendants, the worker processes)."""
    procs = [psutil.Process(pid)]
    if tree:
        procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def rss_of_self() -> int:
    return psutil.Process().memory_info().rss


def run_one(mode: str, paths: list[Path], label: str, args: argparse.Namespace, address: str, sched_pid: int,
            model: Path, work: Path, workers_pid: int) -> dict:
    from geoseg.batch import Scene, run_batch
    from geoseg.config import validate
    from geoseg.config.pipeline import PipelineConfig

    out = work / f"out-{label}-{mode}"
    cfg = validate(PipelineConfig, {
        "model": str(model), "output_dir": str(out),
        "tile": {"size": args.tile, "overlap": args.overlap, "chunk_tiles": args.chunk_tiles},
        "infer": {"torch_threads": 1},
        "write": {"on_workers": mode == "workers", "confidence": "uint8", "datetime": "2026-12-01T10:30:00Z"},
        "vectorize": {"enabled": not args.no_vectorize, "min_area_px": 4, "block": 1024},
        "cluster": {"backend": "address", "address": address},
        "batch": {"concurrent_scenes": args.concurrent if args.concurrent else "auto"}}, "bench", None)
    scenes = [Scene(f"{label}{k:05d}", p) for k, p in enumerate(paths)]
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_of_self()))
            time.sleep(0.5)

    with Client(address) as c:
        c.run_on_scheduler(records)  # drop what earlier runs left
    sampler = threading.Thread(target=sample, daemon=True)
    w0 = cpu_seconds(workers_pid, tree=True)
    s0, r0, t0 = cpu_seconds(sched_pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rss0 = rss_of_self()
    sampler.start()
    report = run_batch(cfg, scenes)
    wall = time.perf_counter() - t0
    r1, s1, w1 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(sched_pid), cpu_seconds(workers_pid, True)
    stop.set()
    sampler.join()
    assert report.ok, report.counts()
    with Client(address) as c:
        done = c.run_on_scheduler(records)
    client_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    tasks = [d for d in done if d[0].startswith("geoseg-")]
    infer = [d for d in tasks if d[0].startswith("geoseg-infer-")]
    # idle per inference slot between the batch's first and last inference
    lo, hi = min(d[2] for d in infer), max(d[3] for d in infer)
    busy: dict[str, float] = {}
    for _, worker, a, b in infer:
        busy[worker] = busy.get(worker, 0.0) + (b - a)
    idle = [1 - busy.get(w, 0.0) / (hi - lo) for w in set(d[1] for d in tasks)]
    # last inference of each scene -> its run.json
    last: dict[str, float] = {}
    for key, _, _, b in infer:
        scene = key[len("geoseg-infer-"):].split(".", 1)[0]
        last[scene] = max(last.get(scene, 0.0), b)
    lag = [(out / s.name / "run.json").stat().st_mtime - last[s.name] for s in scenes if s.name in last]
    stats = [json.loads((out / s.name / "run.json").read_text())["stats"] for s in scenes]
    chunks = [st["chunks"] for st in stats]
    mpix = sum(st["width"] * st["height"] for st in stats) / 1e6
    # task seconds per stage and scene megapixel (wall time of the tasks: an upper bound of their CPU here)
    stage_s: dict[str, float] = {}
    for key, _, a, b in tasks:
        stage = key.split("-")[1]
        stage_s[stage] = stage_s.get(stage, 0.0) + (b - a)
    rss = [r for _, r in samples]
    tenth = rss[max(0, len(rss) // 10)] if rss else rss0
    return {
        "mode": mode, "label": label, "scenes": len(scenes),
        "chunks_per_scene": float(np.mean([a * b for a, b in chunks])),
        "wall_s": round(wall, 2), "scenes_per_s": round(len(scenes) / wall, 3), "tasks": len(tasks),
        "tasks_per_s": round(len(tasks) / wall, 1),
        "scheduler_cpu_s": round(s1 - s0, 2), "scheduler_ms_per_task": round(1000 * (s1 - s0) / len(tasks), 3),
        "client_cpu_s": round(client_cpu, 2), "client_cpu_s_per_scene": round(client_cpu / len(scenes), 4),
        "client_rss_start_mib": round(rss0 / 2**20), "client_rss_at_10pct_mib": round(tenth / 2**20),
        "client_rss_end_mib": round((rss[-1] if rss else rss0) / 2**20),
        "client_rss_peak_mib": round(max(rss, default=rss0) / 2**20),
        "publish_lag_median_s": round(float(np.median(lag)), 3),
        "publish_lag_p95_s": round(float(np.percentile(lag, 95)), 3),
        "slot_idle_mean": round(float(np.mean(idle)), 3), "slot_idle_max": round(float(np.max(idle)), 3),
        "infer_span_s": round(hi - lo, 2), "mpix": round(mpix, 2),
        "worker_cpu_s_per_mpix": round((w1 - w0) / mpix, 3),
        "task_s_per_mpix": {k: round(v / mpix, 3) for k, v in sorted(stage_s.items())},
    }


def extrapolate(summary: dict, scenes: int = 10_000, side: int = 10980, gpus: int = 100, tile: int = 512,
                overlap: int = 64, chunk_tiles: int = 3, classes: int = 6, bands: int = 4,
                gpu_tiles_per_s: tuple[float, ...] = (100.0, 1000.0)) -> list[str]:
    """The night on paper from the fitted costs of ``summary`` (scale.json): docs/scale.md's second table."""
    import math

    r = {(x["mode"], x["label"]): x for x in summary["results"]}
    lines = []
    stride = tile - overlap
    chunk = chunk_tiles * stride
    chunks = math.ceil(side / chunk) ** 2
    tiles = math.ceil((side - overlap) / stride) ** 2
    mpix = side * side / 1e6
    tasks = 3 * chunks + 2  # tile, infer, stitch per chunk; the domain sample and the finish per scene
    for mode in ("client", "workers"):
        small, large = r[mode, "small"], r[mode, "large"]
        per_chunk = (large["client_cpu_s_per_scene"] - small["client_cpu_s_per_scene"]) / (
            large["chunks_per_scene"] - small["chunks_per_scene"])
        per_mpix = (large["client_cpu_s_per_scene"] - small["client_cpu_s_per_scene"]) / (
            large["mpix"] / large["scenes"] - small["mpix"] / small["scenes"])
        fixed = small["client_cpu_s_per_scene"] - per_chunk * small["chunks_per_scene"]
        # Before, the client's cost grows with pixels (it writes them); after, with chunks (it submits them).
        per_scene = (small["client_cpu_s_per_scene"] + per_mpix * (mpix - small["mpix"] / small["scenes"])
                     if mode == "client" else fixed + per_chunk * chunks)
        lines.append(f"{mode}: client {per_scene:.2f} s per scene ({fixed:.3f} s + {1000 * per_chunk:.1f} ms per "
                     f"chunk, or {per_mpix:.3f} s per MPix) -> {scenes * per_scene / 3600:.1f} h of client CPU")
    sched_ms = max(r["workers", "small"]["scheduler_ms_per_task"], r["workers", "large"]["scheduler_ms_per_task"])
    lines.append(f"scene: {mpix:.1f} MPix, {chunks} chunks of {chunk} px, {tiles} tiles, {tasks} tasks; night: "
                 f"{scenes * tasks / 1e6:.2f} M tasks -> scheduler {scenes * tasks * sched_ms / 1000 / 3600:.1f} h "
                 f"at {sched_ms:.1f} ms per task (one core)")
    for g in gpu_tiles_per_s:
        lines.append(f"inference at {g:g} tiles/s per GPU: {scenes * tiles / (g * gpus) / 60:.0f} min on {gpus} GPUs")
    per_px = {"image (uint16, lz4 0.68)": 2 * bands * 0.68, "accumulators (float32 sums, lz4 0.68)":
              4 * (classes + 1) * 0.68 * (chunk + overlap) ** 2 / chunk**2, "block store": 2 * 0.5}
    written = sum(per_px.values())
    read = per_px["image (uint16, lz4 0.68)"] * (chunk + overlap) ** 2 / chunk**2 + per_px[
        "accumulators (float32 sums, lz4 0.68)"] + per_px["block store"]
    total_tb = scenes * mpix * 1e6 * (written + read) / 1e12
    lines.append(f"scratch on the shared filesystem: {written:.0f} B/px written, {read:.0f} B/px read "
                 f"({', '.join(f'{k} {v:.1f}' for k, v in per_px.items())}) -> {total_tb:.0f} TB per night, "
                 f"{total_tb * 1e12 / 8 / 3600 / 1e9:.1f} GB/s over 8 h")
    if "worker_cpu_s_per_mpix" in r["workers", "large"]:
        for mode in ("client", "workers"):
            w = r[mode, "large"]["worker_cpu_s_per_mpix"]
            lines.append(f"{mode}: worker CPU besides the forward {w:.2f} s per MPix -> "
                         f"{scenes * mpix * w / 3600:.0f} core-hours per night")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=1000, help="small scenes per batch")
    p.add_argument("--size", type=int, default=256, help="side of a small scene")
    p.add_argument("--large", type=int, default=3, help="large scenes (a second batch)")
    p.add_argument("--large-size", type=int, default=2048)
    p.add_argument("--workers", type=int, default=8, help="worker processes, one inference slot each")
    p.add_argument("--threads", type=int, default=2, help="task threads per worker")
    p.add_argument("--infer-ms", type=float, default=20.0, help="stand-in forward cost per tile")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--chunk-tiles", type=int, default=2)
    p.add_argument("--concurrent", type=int, default=0, help="batch.concurrent_scenes (0: auto)")
    p.add_argument("--modes", default="client,workers")
    p.add_argument("--no-vectorize", action="store_true")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "geoseg-bench-scale"))
    p.add_argument("--extrapolate", action="store_true", help="print the night on paper from --results")
    p.add_argument("--chunk-tiles-night", type=int, default=3, help="chunk_tiles of the extrapolated night")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one mode's client, started by the parent
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--sched-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--workers-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--results", default="scale.json", help="file name under benchmarks/results/")
    args = p.parse_args()
    if args.extrapolate:
        print("\n".join(extrapolate(json.loads((RESULTS / args.results).read_text()),
                                     chunk_tiles=args.chunk_tiles_night)))
        return
    malloc = control_malloc(True)
    data = Path(args.data)
    if args.child:
        small = make_scenes(data / "scenes", args.scenes, args.size)
        large = make_scenes(data / "scenes", args.large, args.large_size, seed0=90000)
        # One scene first, unmeasured: imports and first uses (the model on every worker) are not a night's cost.
        warm = (small or large)[:1]
        run_one(args.child, warm * (2 * args.workers if small else 1), "warm", args, args.address, args.sched_pid,
                data / "standin-classes.safetensors", Path(args.work), args.workers_pid)
        for label, paths in (("small", small), ("large", large)):
            if paths:
                print(json.dumps(run_one(args.child, paths, label, args, args.address, args.sched_pid,
                                         data / "standin-classes.safetensors", Path(args.work), args.workers_pid)),
                      flush=True)
        return
    print(f"malloc: {malloc}")
    print(f"machine: {machine()}")
    from tests.conftest import make_checkpoint

    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    small = make_scenes(data / "scenes", args.scenes, args.size)
    large = make_scenes(data / "scenes", args.large, args.large_size, seed0=90000)
    print(f"scenes ready in {time.perf_counter() - t0:.0f}s: {len(small)} x {args.size}^2, "
          f"{len(large)} x {args.large_size}^2", flush=True)
    model = data / "standin-classes.safetensors"
    if not model.exists():
        make_checkpoint(model, tile_size=args.tile)

    work = Path(tempfile.mkdtemp(prefix="scale-", dir=data))
    sched_file = work / "scheduler.json"
    env = {**os.environ, **MALLOC, **WORKER_ENV, "GEOSEG_STANDIN_MS": str(args.infer_ms), "PYTHONWARNINGS": "ignore"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)], **quiet)
    workers = None
    results = []
    try:
        while not sched_file.exists():
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        workers = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                    "--nworkers", str(args.workers), "--nthreads", str(args.threads),
                                    "--resources", "infer=1", "--preload", str(ROOT / "benchmarks" / "_standin.py"),
                                    "--no-dashboard", "--memory-limit", "0"], **quiet)
        with Client(address) as c:
            c.wait_for_workers(args.workers, timeout=120)
            c.register_plugin(Record())
        # Each mode's client is a process of its own, so its memory starts from nothing.
        for mode in args.modes.split(","):
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode, "--address", address,
                                    "--sched-pid", str(sched.pid), "--work", str(work),
                                    "--workers-pid", str(workers.pid)],
                                   capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if child.returncode:
                raise SystemExit(f"{mode}: {child.stderr[-3000:]}")
            for line in child.stdout.splitlines():
                if line.startswith("{"):
                    results.append(json.loads(line))
                    print(line, flush=True)
    finally:
        for proc in (workers, sched):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    summary = {"machine": machine(), "malloc": malloc, "infer_ms_per_tile": args.infer_ms,
               "args": {k: v for k, v in vars(args).items()
                        if k not in ("child", "address", "sched_pid", "work", "workers_pid")},
               "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'mode':<8} {'scenes':>7} {'chunks':>6} {'wall s':>7} {'tasks/s':>8} {'sched ms/task':>13} "
          f"{'client s/scene':>14} {'rss MiB 10%/end':>16} {'publish lag s':>14} {'slot idle':>9}")
    for r in results:
        print(f"{r['mode']:<8} {r['scenes']:>7} {r['chunks_per_scene']:>6.0f} {r['wall_s']:>7.1f} "
              f"{r['tasks_per_s']:>8.1f} {r['scheduler_ms_per_task']:>13.3f} {r['client_cpu_s_per_scene']:>14.3f} "
              f"{r['client_rss_at_10pct_mib']:>7}/{r['client_rss_end_mib']:<8} "
              f"{r['publish_lag_median_s']:>6.2f}/{r['publish_lag_p95_s']:<7.2f} {r['slot_idle_mean']:>9.2f}")


if __name__ == "__main__":
    main()

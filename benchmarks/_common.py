"""Helpers shared by the benchmarks: malloc control, peak RSS of a process tree, cached sample scenes."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_ARENA_MAX": "1"}


def control_malloc(enabled: bool = True) -> str:
    """Re-exec this script with the glibc malloc thresholds set (or explicitly unset) for every process.

    glibc reads them at process start, so they must be in the environment before Python starts.
    """
    want = MALLOC if enabled else {}
    current = {k: os.environ.get(k) for k in MALLOC}
    if enabled and all(current[k] == v for k, v in MALLOC.items()):
        return "MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4294967296, MALLOC_ARENA_MAX=1 (every process)"
    if not enabled and not any(current.values()) and os.environ.get("GEOSEG_BENCH_MALLOC") == "off":
        return "glibc malloc defaults (thresholds unset)"
    env = {k: v for k, v in os.environ.items() if k not in MALLOC}
    env.update(want)
    env["GEOSEG_BENCH_MALLOC"] = "on" if enabled else "off"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    raise AssertionError("unreachable")


class PeakRSS:
    """Samples the summed RSS of this process and its children (or the children only) every 50 ms."""

    def __init__(self, children_only: bool = False) -> None:
        self.children_only = children_only
        self.peak = 0
        self.by_process: dict[int, int] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in ([] if self.children_only else [me]) + me.children(recursive=True):
            try:
                rss = p.memory_info().rss
                if p.pid not in self._roles:
                    self._roles[p.pid] = _role(p)
            except psutil.Error:
                continue
            total += rss
            self.by_process[p.pid] = max(self.by_process.get(p.pid, 0), rss)
        return total

    def roles(self) -> dict[str, float]:
        """Peak RSS in GiB of each process seen (``main``, ``worker-<pid>``, ...), each at its own peak."""
        return {f"{self._roles[pid]}-{pid}": rss / 2**30 for pid, rss in sorted(self.by_process.items())}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self.base = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _role(p: psutil.Process) -> str:
    """What a process of a run is: a Dask worker (spawned by multiprocessing) or a main process."""
    cmd = " ".join(p.cmdline())
    if "multiprocessing" in cmd or "spawn_main" in cmd or "forkserver" in cmd:
        return "worker"
    return "main" if "python" in cmd else (p.name() or "other")


def sample_scene(size: int, seed: int = 0) -> Path:
    """A cached synthetic scene of ``size`` x ``size`` under benchmarks/results/data."""
    from geoseg.sample import make_sample

    out = RESULTS / "data" / f"scene-{size}-{seed}"
    if not (out / "scene.tif").exists():
        t0 = time.perf_counter()
        make_sample(out, size, seed, block=2048)
        print(f"  generated {size}x{size} sample in {time.perf_counter() - t0:.0f}s", flush=True)
    return out / "scene.tif"


def cpu_description() -> str:
    """The CPU's model name and the flags that decide precision: bf16 (AVX-512 BF16, AMX) and AVX-512."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2") if f in flags]
    return f"{model} [{' '.join(wanted) or 'no avx2/avx512/amx'}]"


def machine() -> str:
    """The machine a figure came from: CPU model and precision flags, cores, memory, torch, threads, CUDA."""
    import torch

    return (f"{cpu_description()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"cuda {'yes' if torch.cuda.is_available() else 'no'}")


def sample_sd(values) -> float:  # noqa: ANN001
    """Sample standard deviation (ddof 1) of a benchmark's per-seed figures; 0 for a single value."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0

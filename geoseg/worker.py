"""``geoseg worker SCHEDULER``: Dask workers on this machine, set up the way geoseg's own clusters are.

A plain ``dask worker`` runs with glibc's default allocator settings (CPU inference up to 1.5x slower, see
:data:`geoseg.workerenv.MALLOC_ENV`) and GDAL's default block cache, offers no inference slots and shares
every GPU. This starts one worker per GPU (``CUDA_VISIBLE_DEVICES`` each, ``GPU=1``), or one CPU worker
with ``infer`` slots, in a process whose environment carries geoseg's settings from its start (glibc reads
them then), with torch and the model code imported before the first task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from geoseg.cluster import gpu_count
from geoseg.workerenv import INFER, WORKER_ENV

log = logging.getLogger("geoseg")

#: Set in the environment of a process already started with :data:`WORKER_ENV` (no second exec).
_PREPARED = "GEOSEG_WORKER_PREPARED"


@dataclass(frozen=True)
class WorkerSpec:
    """One Dask worker process: its threads, resources and extra environment."""

    name: str
    nthreads: int
    resources: dict[str, float]
    env: dict[str, str] = field(default_factory=dict)


def worker_specs(name: str, nthreads: int | None = None, infer: int = 2, gpus: int | None = None) -> list[WorkerSpec]:
    """The workers for this machine: one per GPU (one thread, ``GPU=1``), else one CPU worker with ``infer`` slots."""
    gpus = gpu_count() if gpus is None else gpus
    if gpus:
        return [WorkerSpec(f"{name}-gpu{k}", 1, {"GPU": 1, INFER: 1}, {"CUDA_VISIBLE_DEVICES": str(k)})
                for k in range(gpus)]
    threads = nthreads or os.cpu_count() or 1
    return [WorkerSpec(name, threads, {INFER: min(infer, threads)})]


def prepared_environment() -> bool:
    """Whether this process started with geoseg's worker environment."""
    return all(os.environ.get(k) == v for k, v in WORKER_ENV.items())


def reexec_prepared() -> None:
    """Start this command again with :data:`WORKER_ENV` set (malloc settings only count from process start)."""
    if prepared_environment() or os.environ.get(_PREPARED):
        return
    env = {**os.environ, **WORKER_ENV, _PREPARED: "1"}
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def dask_setup(worker: object) -> None:
    """Preload (``--preload geoseg.worker``): torch, smp and geoseg's model code imported before the first task."""
    import segmentation_models_pytorch  # noqa: F401
    import torch  # noqa: F401

    import geoseg.segment.predict  # noqa: F401


def serve(address: str, specs: list[WorkerSpec], *, memory_limit: str = "auto", local_directory: str | None = None,
          security: object = None) -> int:
    """Run the workers until SIGINT/SIGTERM or until the scheduler goes away; return an exit code."""
    return asyncio.run(_serve(address, specs, memory_limit, local_directory, security))


async def _serve(address: str, specs: list[WorkerSpec], memory_limit: str, local_directory: str | None,
                 security: object) -> int:
    from distributed import Nanny

    nannies = [Nanny(address, nthreads=s.nthreads, resources=s.resources, env=s.env, name=s.name,
                     memory_limit=memory_limit, local_directory=local_directory, preload=["geoseg.worker"],
                     security=security)
               for s in specs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.gather(*nannies)
    except Exception as exc:  # noqa: BLE001 - one line for the user, as every geoseg error
        from geoseg.errors import ClusterError

        raise ClusterError(f"geoseg worker: could not join {address}: {type(exc).__name__}: {exc}") from None
    for s in specs:
        log.info("worker %s: %d thread%s, resources %s%s, joined %s", s.name, s.nthreads,
                 "" if s.nthreads == 1 else "s", ", ".join(f"{k}={v:g}" for k, v in s.resources.items()),
                 f", CUDA_VISIBLE_DEVICES={s.env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in s.env else "",
                 address)
    finished = [asyncio.ensure_future(n.finished()) for n in nannies]
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopping, *finished], return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)
    for f in [stopping, *finished]:
        f.cancel()
    return 130 if stop.is_set() else 0

"""Dask cluster from the config: a LocalCluster started for the run, or an existing scheduler."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster

from geoseg.config import ClusterConfig
from geoseg.errors import ClusterError

#: glibc returns the forward pass's large buffers to the OS after every batch (and Dask's nanny sets
#: MALLOC_TRIM_THRESHOLD_=65536 by default), which made CPU inference 30-45% slower here. Raising both
#: thresholds keeps the buffers in the process. Dask runs tasks in threads, and glibc's per-thread arenas
#: cannot hold blocks over 64 MiB (a batch of 512 px activations is larger), so they are mmapped and
#: unmapped on every batch whatever the thresholds: forward passes in a worker thread ran 1.5x slower
#: than in the main thread until MALLOC_ARENA_MAX=1 put every thread on the main heap. Set for every
#: worker the nanny spawns.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_ARENA_MAX": "1"}
#: GDAL's block cache defaults to 5% of RAM per process and fills up as a large scene streams through a
#: worker; a task reads each window once, so a small cache loses nothing and keeps memory flat.
GDAL_CACHE_MB = 128
WORKER_ENV = {**MALLOC_ENV, "GDAL_CACHEMAX": str(GDAL_CACHE_MB)}
#: Worker resource an inference task asks for: the number a worker offers is how many it runs at once.
INFER = "infer"


def quiet_dask_logs() -> None:
    """Keep Dask's per-event INFO lines (scheduler start, plugins, ...) off the user's terminal.

    distributed gives its child loggers explicit levels, so the parent's level is not enough.
    """
    verbose = logging.getLogger("geoseg").getEffectiveLevel() <= logging.DEBUG
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def gpu_count() -> int:
    """CUDA devices torch sees on this machine (0 when CUDA is missing or broken)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU"
        return 0


@contextmanager
def open_client(cfg: ClusterConfig, use_gpu: bool = False) -> Iterator[Client]:
    """Yield a connected client; a LocalCluster is closed on exit, a remote scheduler is left running."""
    quiet_dask_logs()
    if cfg.backend == "address":
        try:
            client = Client(cfg.address, timeout=f"{cfg.timeout_s}s", security=_security(cfg))
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cluster.address: cannot reach scheduler {cfg.address} within {cfg.timeout_s:g}s "
                f"({type(exc).__name__})"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if cfg.backend in ("slurm", "pbs"):
        cluster = jobqueue_cluster(cfg, use_gpu)
        try:
            cluster.adapt(minimum_jobs=cfg.jobqueue.minimum_jobs, maximum_jobs=cfg.jobqueue.maximum_jobs)
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return

    n_workers, threads = cfg.n_workers, cfg.threads_per_worker
    # Inference tasks ask for one INFER slot: a worker runs that many at once, its other threads do the I/O.
    resources: dict[str, float] = {INFER: min(cfg.infer_per_worker, threads)}
    if use_gpu:
        # One worker and one thread per GPU (the dask-cuda advice); tasks ask for GPU=1.
        n_workers, threads, resources = max(1, gpu_count()), 1, {"GPU": 1, INFER: 1}
    pre_spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
    with dask.config.set(pre_spawn):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            memory_limit=cfg.memory_limit,
            # Served on localhost only, on a free port so that concurrent runs never clash (None still
            # serves the HTTP routes, on :8787).
            dashboard_address="127.0.0.1:0",
            host="127.0.0.1",
            resources=resources,
            silence_logs=logging.ERROR,
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _security(cfg: ClusterConfig):  # noqa: ANN202
    """Distributed Security for a tls:// scheduler, or None."""
    if cfg.tls is None:
        return None
    from distributed.security import Security

    return Security(tls_ca_file=str(cfg.tls.ca_file), tls_client_cert=str(cfg.tls.cert),
                    tls_client_key=str(cfg.tls.key) if cfg.tls.key else None, require_encryption=True)


def jobqueue_cluster(cfg: ClusterConfig, use_gpu: bool = False):  # noqa: ANN201
    """A dask-jobqueue SLURMCluster or PBSCluster from ``cfg.jobqueue`` (no job is submitted until it scales).

    A GPU job asks for one GPU and runs one worker with one thread and the ``GPU=1`` resource that GPU tasks
    request; the worker environment carries geoseg's malloc and GDAL settings.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(f"cluster.backend: {cfg.backend} needs dask-jobqueue: pip install 'geoseg[slurm]'") from None
    jq = cfg.jobqueue
    gpu = use_gpu or jq.gpus > 0
    directives = list(jq.job_extra_directives)
    # Worker threads are cores / processes; a GPU worker gets one thread and the job keeps all its cores.
    kwargs: dict[str, Any] = {
              "queue": jq.queue, "account": jq.account, "cores": 1 if gpu else jq.cores, "memory": jq.memory,
              "processes": jq.processes, "walltime": jq.walltime, "job_extra_directives": directives,
              "job_script_prologue": [f"export {k}={v}" for k, v in WORKER_ENV.items()] + list(jq.job_script_prologue),
              "worker_extra_args": ["--resources", "GPU=1"] if gpu else [], "log_directory": jq.log_directory,
              "interface": jq.interface, "local_directory": jq.local_directory, "job_name": "geoseg",
              # The scheduler's HTTP server (dashboard, health) listens on localhost only: ssh -L to see it.
              "scheduler_options": {"dashboard_address": "127.0.0.1:0"}}
    cls: Any
    if cfg.backend == "slurm":
        cls = dask_jobqueue.SLURMCluster
        if gpu:
            kwargs["job_cpu"] = jq.cores
            directives.insert(0, "--gres=gpu:1")
    else:
        cls = dask_jobqueue.PBSCluster
        if gpu:
            from dask.utils import parse_bytes

            gib = max(1, parse_bytes(jq.memory) // 2**30)
            kwargs["resource_spec"] = f"select=1:ncpus={jq.cores}:ngpus=1:mem={gib}gb"
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def tasks_per_host(client: Client) -> tuple[int, bool]:
    """Most inference tasks one host runs at once, and whether the workers limit them (the INFER resource).

    Workers geoseg starts offer INFER slots: a host runs that many inference tasks. Other workers (a plain
    ``dask worker``) run one per task thread. CPU inference splits a host's cores between them.
    """
    per_host: dict[str, int] = {}
    workers = client.scheduler_info().get("workers", {})
    limited = bool(workers) and all(w.get("resources", {}).get(INFER, 0) >= 1 for w in workers.values())
    for addr, w in workers.items():
        host = w.get("host") or addr.rsplit(":", 1)[0]
        slots = int(w.get("resources", {}).get(INFER, 0)) if limited else w.get("nthreads", 1)
        per_host[host] = per_host.get(host, 0) + slots
    return max(per_host.values(), default=1), limited


def iter_results(tasks: list, client: Client | None = None) -> Iterator[Any]:
    """Run Dask ``tasks`` and yield each result as soon as it is done, in completion order.

    On the cluster of ``client`` when given; otherwise on two local threads (each task on the synchronous
    scheduler). Results are handed over and dropped one by one, so they never pile up in memory; when the
    consumer stops early, the tasks not yet done are cancelled.
    """
    if client is not None:
        from distributed import as_completed

        futures = client.compute(tasks)
        try:
            for fut in as_completed(futures):
                result = fut.result()
                fut.release()
                yield result
        finally:
            client.cancel([f for f in futures if not f.done()])
        return
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import as_completed as completed

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(t.compute, scheduler="sync") for t in tasks]
        try:
            for fut in completed(pending):
                yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def for_each_result(tasks: list, consume: Callable[[Any], None], client: Client | None = None) -> None:
    """Hand each result of ``tasks`` to ``consume`` as soon as it is done (:func:`iter_results`)."""
    for result in iter_results(tasks, client):
        consume(result)


def map_in_order(task_groups: list[list], client: Client | None = None, lookahead: int = 2) -> Iterator[list]:
    """Compute groups of Dask ``tasks`` and yield each group's results in order, ``lookahead`` groups ahead.

    The next groups run while the caller consumes one, and no more than ``lookahead`` finished groups wait
    in memory. On the cluster of ``client`` when given; otherwise each task runs on the synchronous
    scheduler in a pool of two local threads.
    """
    from collections import deque

    if client is not None:
        def submit(k: int):  # noqa: ANN202
            return client.compute(task_groups[k])

        def collect(futures) -> list:  # noqa: ANN001
            results = client.gather(futures)
            for fut in futures:
                fut.release()
            return results
    else:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=2)

        def submit(k: int):  # noqa: ANN202
            return [pool.submit(t.compute, scheduler="sync") for t in task_groups[k]]

        def collect(futures) -> list:  # noqa: ANN001
            return [f.result() for f in futures]
    pending = deque(submit(k) for k in range(min(lookahead, len(task_groups))))
    try:
        for k in range(len(task_groups)):
            futures = pending.popleft()
            if k + lookahead < len(task_groups):
                pending.append(submit(k + lookahead))
            yield collect(futures)
    finally:
        if client is None:
            pool.shutdown(wait=True, cancel_futures=True)

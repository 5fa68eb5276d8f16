"""Dask cluster from the config: a LocalCluster started for the run, or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.client import ClosedClientError

from geoseg.config import ClusterConfig
from geoseg.errors import ClusterError
from geoseg.workerenv import INFER, WORKER_ENV

log = logging.getLogger("geoseg")



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
def open_client(cfg: ClusterConfig, use_gpu: bool = False, *, name: str = "geoseg",
                log_directory: str | None = None) -> Iterator[Client]:
    """Yield a connected client; a LocalCluster is closed on exit, a remote scheduler is left running.

    For an existing scheduler or SLURM/PBS jobs it returns once a worker is connected, and its waits stay
    bounded while it is used (:class:`Health`). ``name`` and ``log_directory`` are the worker jobs' name and
    log folder (SLURM/PBS) when the config names none.
    """
    quiet_dask_logs()
    if cfg.dashboard:
        try:
            import bokeh
        except ImportError:
            raise ClusterError("cluster.dashboard: the Dask dashboard needs bokeh>=3.1: pip install "
                               "'geoseg[dashboard]'") from None
        if int(bokeh.__version__.split(".")[0]) < 3:
            raise ClusterError(f"cluster.dashboard: the Dask dashboard needs bokeh>=3.1 (found {bokeh.__version__})"
                               ": pip install 'geoseg[dashboard]'")
    if cfg.backend == "address":
        assert cfg.address is not None
        _reachable(cfg.address, cfg.timeout_s)
        _handshake(cfg)
        try:
            client = Client(cfg.address, timeout=f"{cfg.timeout_s}s", security=_security(cfg))
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cluster.address: cannot reach scheduler {cfg.address} within {cfg.timeout_s:g}s "
                f"({type(exc).__name__})"
            ) from None
        try:
            health = Health(cfg.worker_timeout_s, lambda: f"scheduler {cfg.address} has no worker; start them with: "
                            f"geoseg worker {cfg.address}")
            _HEALTH[client] = health
            health.wait(client)
            warn_unprepared_workers(client)
            yield client
        finally:
            client.close()
        return
    if cfg.backend in ("slurm", "pbs"):
        from geoseg.hpc import adapt, check_submission, jobqueue_cluster

        cluster, watch = jobqueue_cluster(cfg, use_gpu, name=name, log_directory=log_directory)
        try:
            if cfg.backend == "slurm":
                check_submission(cluster, cfg)
            adapt(cluster, cfg)
            with Client(cluster) as client:
                health = Health(cfg.worker_timeout_s, watch.describe, lambda: watch.refused)
                _HEALTH[client] = health
                health.wait(client)
                yield client
        finally:
            _close_quietly(cluster)
        return

    n_workers, threads = cfg.n_workers, cfg.threads_per_worker
    # Inference tasks ask for one INFER slot: a worker runs that many at once, its other threads do the I/O.
    resources: dict[str, float] = {INFER: min(cfg.infer_per_worker, threads)}
    if use_gpu:
        # One worker and one thread per GPU (the dask-cuda advice); tasks ask for GPU=1.
        n_workers, threads, resources = max(1, gpu_count()), 1, {"GPU": 1, INFER: 1}
    pre_spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
    with dask.config.set({**pre_spawn, "distributed.worker.memory.pause": False}):  # see workerenv.PAUSE_ENV
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
        _close_quietly(cluster)


def _close_quietly(cluster: Any, timeout_s: float = 20) -> None:
    """Close a cluster within ``timeout_s`` (a stuck close must not keep an interrupted run alive)."""
    try:
        cluster.close(timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - closing is best effort; the jobs end with their walltime anyway
        log.debug("closing the cluster: %s: %s", type(exc).__name__, exc)


def _reachable(address: str, timeout_s: float) -> None:
    """Fail at once when nothing listens at ``address`` (Dask's client would retry until its timeout)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls") or parts.hostname is None or parts.port is None:
        return
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=min(timeout_s, 10.0)):
            pass
    except ConnectionRefusedError:
        raise ClusterError(f"cluster.address: {address} refused the connection: no scheduler listens there "
                           "(start one with: dask scheduler)") from None
    except socket.gaierror:
        raise ClusterError(f"cluster.address: unknown host {parts.hostname!r} in {address}") from None
    except OSError:
        return  # a timeout or a route problem: Client reports it within cluster.timeout_s


def _handshake(cfg: ClusterConfig) -> None:
    """Fail within ``cluster.timeout_s`` when ``cluster.address`` does not answer as a Dask scheduler.

    Dask's Client waits for ever on a port that accepts connections but never completes Dask's handshake
    (a proxy, another service, a hung scheduler), whatever its ``timeout``: this probe bounds that wait.
    """
    import asyncio

    from distributed.comm import connect

    security = _security(cfg)
    kwargs = security.get_connection_args("client") if security is not None else {}

    async def probe() -> None:
        comm = await asyncio.wait_for(connect(cfg.address, timeout=cfg.timeout_s, **kwargs), cfg.timeout_s + 1)
        await comm.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cluster.address: cannot reach scheduler {cfg.address} within {cfg.timeout_s:g}s "
            f"({type(exc).__name__}); is it a Dask scheduler, and does it answer?"
        ) from None


#: Seconds between progress lines while no worker is connected, and before the first one.
WAIT_LINE_S, FIRST_LINE_S = 15.0, 5.0


class Health:
    """The workers of a remote cluster, watched while geoseg waits on it: no wait lasts for ever.

    :meth:`check` (called by the waits every couple of seconds) raises :class:`ClusterError` when a worker
    job was refused, or when no worker has been connected for ``timeout_s``; meanwhile it writes a line
    every 15 s saying what it waits for (``describe``).
    """

    def __init__(self, timeout_s: float, describe: Callable[[], str],
                 refused: Callable[[], str | None] | None = None) -> None:
        self.timeout_s, self.describe, self.refused = timeout_s, describe, refused
        self._lock = threading.Lock()
        self._since: float | None = None
        self._last_probe = self._last_line = 0.0

    def check(self, client: Client, every_s: float = 2.0) -> None:
        """Raise when the cluster cannot go on; say what it waits for."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_probe < every_s:
                return
            self._last_probe = now
            reason = self.refused() if self.refused else None
            if reason:
                raise ClusterError(f"cluster.jobqueue: {reason}")
            if client.nthreads():
                self._since = None
                return
            if self._since is None:
                self._since, self._last_line = now, now - WAIT_LINE_S + FIRST_LINE_S
            waited = now - self._since
            if waited >= self.timeout_s:
                raise ClusterError(f"cluster.worker_timeout_s: no worker for {waited:.0f}s: {self.describe()}; "
                                   "free or add resources, ask for less (cluster.jobqueue), or wait longer")
            if now - self._last_line >= WAIT_LINE_S:
                self._last_line = now
                log.info("waiting for workers (%.0fs of %.0fs): %s", waited, self.timeout_s, self.describe())

    def wait(self, client: Client) -> None:
        """Return once a worker is connected (or raise as :meth:`check` does)."""
        from geoseg import interrupt

        while True:
            interrupt.check()
            self.check(client, every_s=0.5)
            if self._since is None and self._last_probe:  # the last probe saw workers
                return
            time.sleep(0.25)


_HEALTH: weakref.WeakKeyDictionary[Client, Health] = weakref.WeakKeyDictionary()


def _worker_settings() -> list[str]:  # runs on each worker
    import os

    return [k for k, v in WORKER_ENV.items() if os.environ.get(k) != v]


def warn_unprepared_workers(client: Client) -> None:
    """Warn when workers of an existing scheduler run without geoseg's allocator and GDAL settings."""
    try:
        missing = {addr: m for addr, m in client.run(_worker_settings).items() if m}
    except Exception:  # noqa: BLE001 - a worker that cannot answer is no reason to stop
        return
    if missing:
        names = sorted({k for m in missing.values() for k in m})
        log.warning("%d of %d workers run without geoseg's settings (%s; CPU inference up to 1.5x slower): start "
                    "them with: geoseg worker %s", len(missing), len(client.nthreads()), ", ".join(names),
                    client.scheduler_info().get("address", "ADDRESS"))


def _security(cfg: ClusterConfig):  # noqa: ANN202
    """Distributed Security for a tls:// scheduler, or None."""
    if cfg.tls is None:
        return None
    from distributed.security import Security

    return Security(tls_ca_file=str(cfg.tls.ca_file), tls_client_cert=str(cfg.tls.cert),
                    tls_client_key=str(cfg.tls.key) if cfg.tls.key else None, require_encryption=True)


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


def inference_slots(client: Client, cfg: ClusterConfig | None = None) -> int:
    """Inference tasks the cluster runs at once: its workers' INFER slots (task threads for plain workers).

    For SLURM/PBS (``cfg``) the most the adaptive cluster will have, whatever has joined so far.
    """
    slots = 0
    for w in client.scheduler_info().get("workers", {}).values():
        slots += int(w.get("resources", {}).get(INFER, 0)) or int(w.get("nthreads", 1))
    if cfg is not None and cfg.backend in ("slurm", "pbs"):
        jq = cfg.jobqueue
        per_worker = 1 if jq.gpus else max(1, min(cfg.infer_per_worker, jq.cores // jq.processes))
        slots = max(slots, jq.maximum_jobs * jq.processes * per_worker)
    return slots


def iter_results(tasks: list, client: Client | None = None) -> Iterator[Any]:
    """Run Dask ``tasks`` (or wait for futures submitted already) and yield each result as it is done.

    Results come in completion order. On the cluster of ``client`` when given; otherwise on two local
    threads (each task on the synchronous scheduler). Results are handed over and dropped one by one, so
    they never pile up in memory; when the consumer stops early, the tasks not yet done are cancelled.
    """
    if client is not None:
        from distributed import Future

        futures = tasks if all(isinstance(t, Future) for t in tasks) else client.compute(tasks)
        try:
            for fut in completed(client, futures):
                result = fut.result()
                fut.release()
                yield result
        finally:
            # A generator left open is finalised late, e.g. when a batch is stopped by SIGTERM and its client
            # has closed already: there is nothing left to cancel then, and cleanup must not raise.
            if client.status == "running":
                with contextlib.suppress(ClosedClientError):
                    client.cancel([f for f in futures if not f.done()])
        return
    from concurrent.futures import as_completed as finishing

    with local_pool() as pool:
        pending = [pool.submit(t.compute, scheduler="sync") for t in tasks]
        try:
            for fut in finishing(pending):
                yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def completed(client: Client, futures: list) -> Iterator[Any]:
    """``futures`` as they finish (``distributed.as_completed``), never waiting blindly.

    Between results a stop request (:mod:`geoseg.interrupt`) and, for a cluster from :func:`open_client`,
    the workers' :class:`Health` are checked: a run with no worker left ends with a clear error after
    ``cluster.worker_timeout_s``, and SIGTERM ends it within a second, in any thread.
    """
    from distributed import as_completed

    from geoseg import interrupt

    ac = as_completed(futures)
    health = _HEALTH.get(client)
    while not ac.is_empty():
        if ac.has_ready():
            yield from ac.next_batch(block=False)
            continue
        interrupt.check()
        if health is not None:
            health.check(client)
        # as_completed's own condition (what its blocking __next__ polls): woken as soon as a future finishes.
        with ac.thread_condition:
            ac.thread_condition.wait(timeout=0.2)


#: Threads of the local pool that runs tasks when no Dask client is given (the reference machine's cores).
LOCAL_THREADS = 2


def local_pool() -> ThreadPoolExecutor:
    """The pool that runs a stage's tasks without a cluster: the one fallback of every stage."""
    return ThreadPoolExecutor(max_workers=LOCAL_THREADS, thread_name_prefix="geoseg-local")


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
            for _ in completed(client, futures):  # bounded: stop requests and the workers' health are checked
                pass
            results = client.gather(futures)
            for fut in futures:
                fut.release()
            return results
    else:
        pool = local_pool()

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

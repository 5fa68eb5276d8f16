"""Workers as SLURM or PBS jobs (dask-jobqueue), with the faults of a real queue made plain.

- Before anything is submitted, SLURM checks the worker job (``sbatch --test-only``): an unknown partition
  or a job larger than every node fails at once with sbatch's own reason.
- A submission refused later (a quota, a closed partition) is remembered with the queue's reason and ends
  the run with it, instead of being retried in a loop that prints a traceback each time.
- Adaptive scaling never keeps more than ``max_pending_jobs`` jobs waiting in the queue: a job that
  cannot start is not joined by more that cannot either.
- While no worker is connected, :meth:`JobWatch.describe` says which jobs wait and why (squeue's state and
  reason), for the progress lines and the timeout of :class:`geoseg.cluster.Health`.
- Job ids and their log files go to the log as they are submitted.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoseg.config import ClusterConfig
from geoseg.errors import ClusterError

log = logging.getLogger("geoseg")

#: Seconds a queue command (sbatch --test-only, squeue) may take before it counts as failed.
COMMAND_TIMEOUT_S = 30


def job_name(name: str) -> str:
    """A job name the queues accept: letters, digits, ``._-`` only (``geoseg-2026-11-30``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:64] or "geoseg"


def queue_reason(text: str) -> str:
    """The queue's own words from a failed submission's output: its error lines, on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|denied|invalid|not available|exceed", ln, re.I)
              and not ln.startswith(("Command", "Exit code"))]
    picked = errors or lines[-1:] or ["no output"]
    return "; ".join(dict.fromkeys(re.sub(r"^(sbatch|qsub): (error: )?", "", ln) for ln in picked))


class JobWatch:
    """What the queue did with the worker jobs: the ids submitted, the first refusal, their states."""

    def __init__(self, backend: str, log_directory: str | None, name: str) -> None:
        self.backend, self.log_directory, self.name = backend, log_directory, name
        self.submitted: list[str] = []
        self.refused: str | None = None
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        """SLURM or PBS, as the user calls it."""
        return self.backend.upper()

    def on_submitted(self, job_id: str, workers: int) -> None:
        """A job was accepted: its id and log files go to the log."""
        with self._lock:
            self.submitted.append(job_id)
        where = Path(self.log_directory or Path.cwd())
        if self.backend == "slurm":
            logs = f"{where / f'{self.name}-{job_id}.err'} and .out"
        else:
            logs = f"{where} ({self.name}.o{job_id.split('.')[0]})"
        log.info("submitted %s job %s (%s, %d worker%s); logs: %s", self.kind, job_id, self.name, workers,
                 "" if workers == 1 else "s", logs)

    def on_refused(self, message: str) -> None:
        """A submission failed: the first reason is kept (and logged once)."""
        with self._lock:
            if self.refused is not None:
                return
            self.refused = f"{self.kind} refused the worker job: {queue_reason(message)}"
        log.error("%s", self.refused)

    def describe(self) -> str:
        """What the jobs are doing, e.g. ``SLURM job 12 (PENDING: Resources)``."""
        with self._lock:
            ids = list(self.submitted)
        if not ids:
            return f"no {self.kind} job submitted yet"
        states = job_states(self.backend, ids[-5:])
        parts = [f"{self.kind} job {i} ({states.get(i, 'state unknown')})" for i in ids[-5:]]
        return ", ".join(parts)


def job_states(backend: str, ids: list[str]) -> dict[str, str]:
    """``id -> 'PENDING: Resources'`` from squeue (SLURM) or ``'Q'`` from qstat (PBS); jobs gone are left out."""
    try:
        if backend == "slurm":
            out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"], capture_output=True,
                                 text=True, timeout=COMMAND_TIMEOUT_S).stdout
            states = {}
            for line in out.splitlines():
                job, state, reason = (line.split("|") + ["", ""])[:3]
                states[job.strip()] = state if reason in ("", "None") else f"{state}: {reason}"
            return states
        out = subprocess.run(["qstat", *ids], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S).stdout
        return {ln.split()[0]: f"state {ln.split()[4]}" for ln in out.splitlines()[2:] if len(ln.split()) > 4}
    except (OSError, subprocess.SubprocessError):
        return {}


def check_submission(cluster: Any, cfg: ClusterConfig) -> None:
    """Ask SLURM whether the worker job could ever run (``sbatch --test-only``); refuse with its reason."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ClusterError("cluster.backend: slurm, but sbatch is not on PATH here: run geoseg where SLURM's "
                           "commands are (a login node, or inside a job)")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="geoseg-job-") as f:
        f.write(cluster.job_script())
        f.flush()
        try:
            done = subprocess.run([sbatch, "--test-only", f.name], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"cluster.backend: slurm: sbatch --test-only did not answer in {COMMAND_TIMEOUT_S}s "
                               "(is slurmctld up? scontrol ping)") from None
    if done.returncode != 0:
        jq = cfg.jobqueue
        asked = f"partition {jq.queue or '(default)'}, {jq.cores} cores, {jq.memory}, walltime {jq.walltime}"
        raise ClusterError(f"cluster.jobqueue: SLURM refuses the worker job ({asked}): "
                           f"{queue_reason(done.stderr + done.stdout)}")


def _job_class(base: type, watch: JobWatch) -> type:
    """``base`` (SLURMJob, PBSJob) reporting to ``watch``: ids and logs as submitted, a refusal without a loop.

    Through dask-jobqueue's public interface: ``job_cls`` is a documented JobQueueCluster argument and a
    Job subclass is how its docs customise submission. One step goes beyond it: a refused submission marks
    the job as started, because SpecCluster (distributed) recreates every worker of its spec that is not
    running on each adapt or scale tick, and neither it nor dask-jobqueue has a hook for "this job will
    never start": without it a closed partition is resubmitted (with a traceback) for as long as the run.
    """
    from distributed.core import Status

    class WatchedJob(base):
        async def start(self) -> None:
            try:
                await super().start()
            except RuntimeError as exc:  # the submit command failed; dask-jobqueue would retry it for ever
                watch.on_refused(str(exc))
                self.job_id = None
                # Started as far as the cluster is concerned (nothing to wait for, nothing to cancel): the run
                # stops on the refusal instead of resubmitting.
                self.status = Status.running
                return
            watch.on_submitted(str(self.job_id), int(getattr(self, "worker_processes", 1) or 1))

    WatchedJob.__name__ = WatchedJob.__qualname__ = f"Watched{base.__name__}"
    return WatchedJob


def _adaptive_class(max_pending_jobs: int, per_job: int) -> type:
    """Adaptive scaling that keeps at most ``max_pending_jobs`` jobs in the queue beyond those connected.

    ``Adaptive=`` is distributed's public hook for the policy; ``per_job`` is the worker processes per job.
    """
    from distributed.deploy.adaptive import Adaptive

    class QueueAwareAdaptive(Adaptive):
        async def target(self) -> int:
            want = await super().target()
            started_jobs = -(-len(self.observed) // per_job)
            return int(min(want, (started_jobs + max_pending_jobs) * per_job))

    return QueueAwareAdaptive


def jobqueue_cluster(cfg: ClusterConfig, use_gpu: bool = False, *, name: str = "geoseg",
                     log_directory: str | None = None) -> tuple[Any, JobWatch]:
    """A dask-jobqueue SLURMCluster or PBSCluster from ``cfg.jobqueue`` and the watch of its jobs.

    No job is submitted until it scales. A GPU job asks for one GPU and runs one worker with one thread and
    the ``GPU=1`` resource that GPU tasks request; the worker environment carries geoseg's malloc and GDAL
    settings. ``name`` is the jobs' name, ``log_directory`` where their logs go when the config names none.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(f"cluster.backend: {cfg.backend} needs dask-jobqueue: pip install 'geoseg[slurm]'") from None
    from geoseg.workerenv import INFER, WORKER_ENV

    jq = cfg.jobqueue
    gpu = use_gpu or jq.gpus > 0
    directives = list(jq.job_extra_directives)
    name = job_name(jq.job_name or name)
    logs = jq.log_directory or log_directory
    if logs:
        Path(logs).mkdir(parents=True, exist_ok=True)  # SLURM does not create it: a job would fail silently
    threads = 1 if gpu else max(1, jq.cores // jq.processes)
    resources = f"GPU=1,{INFER}=1" if gpu else f"{INFER}={min(cfg.infer_per_worker, threads)}"
    # Worker threads are cores / processes; a GPU worker gets one thread and the job keeps all its cores.
    kwargs: dict[str, Any] = {
        "queue": jq.queue, "account": jq.account, "cores": 1 if gpu else jq.cores, "memory": jq.memory,
        "processes": jq.processes, "walltime": jq.walltime, "job_extra_directives": directives,
        "job_script_prologue": [f"export {k}={v}" for k, v in WORKER_ENV.items()] + list(jq.job_script_prologue),
        "worker_extra_args": ["--resources", resources], "log_directory": logs,
        "interface": jq.interface, "local_directory": jq.local_directory, "job_name": name,
        # The scheduler's HTTP server (dashboard, health) listens on localhost only: ssh -L to see it.
        "scheduler_options": {"dashboard_address": "127.0.0.1:0"},
    }
    base: Any
    cls: Any
    if cfg.backend == "slurm":
        cls, base = dask_jobqueue.SLURMCluster, dask_jobqueue.slurm.SLURMJob
        if gpu:
            kwargs["job_cpu"] = jq.cores
            directives.insert(0, "--gres=gpu:1")
    else:
        cls, base = dask_jobqueue.PBSCluster, dask_jobqueue.pbs.PBSJob
        if gpu:
            from dask.utils import parse_bytes

            gib = max(1, parse_bytes(jq.memory) // 2**30)
            kwargs["resource_spec"] = f"select=1:ncpus={jq.cores}:ngpus=1:mem={gib}gb"
    watch = JobWatch(cfg.backend, logs, name)
    kwargs["job_cls"] = _job_class(base, watch)
    return cls(**{k: v for k, v in kwargs.items() if v is not None}), watch


def adapt(cluster: Any, cfg: ClusterConfig) -> None:
    """Scale ``cluster`` with the work between ``minimum_jobs`` and ``maximum_jobs``, few jobs waiting at once.

    At least one job while the run lasts, whatever ``minimum_jobs``: geoseg sizes its graph from the workers
    it sees, so it waits for the first one before submitting work, and Dask's adaptive scaling starts no job
    without work. The cluster, and with it every job, ends with the run.
    """
    jq = cfg.jobqueue
    policy = _adaptive_class(jq.max_pending_jobs, max(1, jq.processes))
    cluster.adapt(Adaptive=policy, minimum_jobs=max(1, jq.minimum_jobs),
                  maximum_jobs=max(1, jq.maximum_jobs))


def submit_array(pipeline: str, scenes: str, overrides: Sequence[str], tasks: int, output_dir: Path,
                 sbatch_args: Sequence[str] = (), flags: Sequence[str] = ()) -> str:
    """Submit a night's batch as one SLURM job array of ``tasks`` tasks; returns the array's job id.

    Task ``k`` runs ``geoseg batch PIPELINE --scenes SPEC --shard k/N`` with a local cluster on its node
    (its GPUs where it has them), so each task is a whole batch of its share of the scenes, resumable and
    failure-isolated as any; the shards merge their rows into ``output_dir/batch.json``. The job script is
    written to ``output_dir/logs/array/`` (its tasks' output beside it) and submitted with ``sbatch_args``
    (e.g. ``-p gpu --gres=gpu:1 -t 04:00:00``).
    """
    import shlex
    import sys
    import time

    if shutil.which("sbatch") is None:
        raise ClusterError("--submit: sbatch not found; submit from a SLURM login node")
    logs = Path(output_dir) / "logs" / "array"
    logs.mkdir(parents=True, exist_ok=True)
    name = job_name(f"geoseg-{Path(output_dir).name}")
    command = [sys.executable, "-m", "geoseg", "batch", str(Path(pipeline).absolute()), "--scenes", scenes,
               *[a for o in overrides for a in ("--set", o)], "--set", "cluster.backend=local", *flags]
    script = logs / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.sbatch"
    script.write_text(f"""#!/usr/bin/env bash
# geoseg batch as a SLURM job array, written by geoseg batch --submit {tasks}: task k runs shard k of {tasks}.
#SBATCH -J {name}
#SBATCH --array=0-{tasks - 1}
#SBATCH -o {logs}/%x-%A_%a.out
#SBATCH --signal=B:TERM@120
set -uo pipefail
cd {shlex.quote(str(Path.cwd()))}
exec {shlex.join(command)} --shard "${{SLURM_ARRAY_TASK_ID}}/{tasks}"
""")
    try:
        done = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script)], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"--submit: sbatch did not answer within {COMMAND_TIMEOUT_S}s") from None
    if done.returncode:
        raise ClusterError(f"--submit: SLURM refused the job array: {queue_reason(done.stderr + done.stdout)}")
    job = done.stdout.strip().split(";")[0]
    log.info("submitted SLURM job array %s (%d tasks, %s); logs: %s", job, tasks, script.name, logs)
    return job

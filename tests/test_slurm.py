"""The SLURM backend on a real (private, single-node) SLURM: results, faults with their time bounds, nightly jobs.

Every test here uses the ``slurm`` fixture (tests/private_slurm.py): it installs Debian's packages when
missing (as root) and skips, saying why, where it cannot run; ``GEOSEG_REQUIRE_SLURM=1`` (CI) makes that
a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from geoseg.batch import expand_scenes, run_batch
from tests.conftest import pipeline_config
from tests.test_batch import outputs_of, scenes_in

#: The SLURM tier (docs/testing.md): python3 dev.py test --all runs it, the fast tier does not.
pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"tile": {"size": 64, "overlap": 16}, "vectorize": {"enabled": False}, "write": {"stac_item": False}}


def slurm_yaml(path: Path, model: Path, out: Path, **jobqueue) -> Path:  # noqa: ANN003
    """A pipeline whose workers are SLURM jobs of one core (two fit the node with the client's job)."""
    worker_timeout = jobqueue.pop("worker_timeout_s", 240)
    path.write_text(yaml.safe_dump({
        "model": str(model), "output_dir": str(out), **COMMON,
        "cluster": {"backend": "slurm", "worker_timeout_s": worker_timeout,
                    "jobqueue": {"cores": 1, "memory": "2GiB", "processes": 1, "walltime": "00:30:00",
                                 "maximum_jobs": 1, **jobqueue}}}))
    return path


def geoseg(*args: str, **kwargs) -> subprocess.Popen:  # noqa: ANN003
    """``geoseg ARGS`` as a user runs it: its own process, stderr kept for the checks."""
    return subprocess.Popen([sys.executable, "-m", "geoseg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def finished(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """Exit code, stderr and seconds taken, failing the test if it takes longer than ``timeout``."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running after {timeout:g}s:\n{err[-3000:]}")
    return proc.returncode, err, time.monotonic() - t0


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("geoseg: ")]


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:g}s")


@contextmanager
def busy_node(slurm):  # noqa: ANN001, ANN201
    """Every CPU of the node taken by a sleeping job: worker jobs wait for resources."""
    job = slurm.command("sbatch", "--parsable", "-J", "blocker", "-c", str(slurm.cpus), "--mem=100M", "-o", "/dev/null",
                        "--wrap", "sleep 900").stdout.strip().split(";")[0]
    try:
        wait_for(lambda: any(j["id"] == job and j["state"] == "RUNNING" for j in slurm.jobs()), 60, "blocker running")
        yield job
    finally:
        slurm.command("scancel", job, check=False)
        wait_for(lambda: all(j["id"] != job for j in slurm.jobs()), 60, "blocker gone")


def test_a_batch_on_slurm_equals_the_local_backend(slurm, tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in", n=3)
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    local = run_batch(pipeline_config(paths[0], fcn_checkpoint, tmp_path / "local", **COMMON), scenes, client=client)
    assert local.ok
    cfg = slurm_yaml(tmp_path / "slurm.yaml", fcn_checkpoint, tmp_path / "night-1")
    code, err, seconds = finished(geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")), 300)
    assert code == 0, err
    expected = outputs_of(tmp_path / "local", ["scene0", "scene1", "scene2"])
    got = outputs_of(tmp_path / "night-1", ["scene0", "scene1", "scene2"])
    assert all(np.array_equal(got[n], expected[n]) for n in expected)
    # The job carried the batch's name; its id and log files are in the log, and the logs exist.
    submitted = [ln for ln in err.splitlines() if "submitted SLURM job" in ln]
    assert submitted and "geoseg-night-1" in submitted[0], err
    job = submitted[0].split("submitted SLURM job ")[1].split()[0]
    assert (tmp_path / "night-1" / "logs" / "workers" / f"geoseg-night-1-{job}.err").exists()
    assert seconds < 300


@pytest.mark.parametrize("jobqueue,reason", [
    ({"queue": "nosuchpartition"}, "invalid partition"),
    ({"memory": "900GiB"}, "not available|can not be satisfied|memory"),
])
def test_a_rejected_submission_fails_within_60s_quoting_sbatch(slurm, tmp_path, fcn_checkpoint, jobqueue, reason):  # noqa: ANN001
    scenes_in(tmp_path / "in", n=1)
    cfg = slurm_yaml(tmp_path / "slurm.yaml", fcn_checkpoint, tmp_path / "out", **jobqueue)
    code, err, seconds = finished(geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")), 60)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1, err  # nothing could run: one line, no traceback
    assert "SLURM refuses the worker job" in lines[0] and re.search(reason, lines[0], re.I), lines[0]
    assert "Traceback" not in err and "Exception in callback" not in err
    assert seconds < 60 and not [j for j in slurm.jobs() if j["name"].startswith("geoseg")]



def test_a_job_pending_for_resources_is_reported_then_times_out(slurm, tmp_path, fcn_checkpoint):  # noqa: ANN001
    scenes_in(tmp_path / "in", n=3)
    cfg = slurm_yaml(tmp_path / "slurm.yaml", fcn_checkpoint, tmp_path / "queued", maximum_jobs=3,
                     worker_timeout_s=25)
    with busy_node(slurm):
        proc = geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif"))
        pending_seen = []
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 90:
            pending_seen.append(sum(1 for j in slurm.jobs() if j["name"] == "geoseg-queued"))
            time.sleep(0.5)
        code, err, _ = finished(proc, 30)
        seconds = time.monotonic() - t0
    assert re.search(r"waiting for workers .*SLURM job \d+ \(PENDING: Resources\)", err), err
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "no worker for 2" in lines[0] and "PENDING: Resources" in lines[0], err
    assert 25 <= seconds < 60
    # Adaptive scaling wanted 3 jobs; never more than max_pending_jobs (1) sat in the queue, and none is left.
    assert max(pending_seen) == 1 and not [j for j in slurm.jobs() if j["name"] == "geoseg-queued"]


def test_sigterm_while_waiting_for_a_worker_ends_the_batch_within_seconds(slurm, tmp_path, fcn_checkpoint):  # noqa: ANN001
    scenes_in(tmp_path / "in", n=2)
    cfg = slurm_yaml(tmp_path / "slurm.yaml", fcn_checkpoint, tmp_path / "out", worker_timeout_s=600)
    with busy_node(slurm):
        # SIGTERM during submission (as soon as the batch has planned its scenes) ...
        early = geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif"))
        early_out = tmp_path / "out" / "batch.json"
        wait_for(lambda: early.poll() is not None or any(j["name"] == "geoseg-out" for j in slurm.jobs()), 60,
                 "worker job submitted")
        early.send_signal(signal.SIGTERM)
        code, err, seconds = finished(early, 15)
        assert code == 130 and seconds < 15, err
        assert "interrupted" in err and "Traceback" not in err
        # ... and while the job waits in the queue.
        proc = geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif"))
        wait_for(lambda: any(j["name"] == "geoseg-out" and j["state"] == "PENDING" for j in slurm.jobs()), 60,
                 "worker job pending")
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        code, err, seconds = finished(proc, 15)
    assert code == 130 and seconds < 15, err
    rows = json.loads(early_out.read_text())["scenes"]
    assert {r["status"] for r in rows} == {"interrupted"}, rows  # none "failed" because of the stop itself
    assert not list(tmp_path.rglob("*.tmp-*")) and not list(tmp_path.rglob("*.scratch"))
    wait_for(lambda: not [j for j in slurm.jobs() if j["name"] == "geoseg-out"], 30, "worker job cancelled")


def test_a_cancelled_worker_job_is_replaced_and_the_batch_finishes(slurm, tmp_path, client, unet_checkpoint):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in", n=3, shape=(320, 288))
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    common = {**COMMON, "tile": {"size": 64, "overlap": 16, "chunk_tiles": 1}}
    assert run_batch(pipeline_config(paths[0], unet_checkpoint, tmp_path / "local", **common), scenes,
                     client=client).ok
    cfg = slurm_yaml(tmp_path / "slurm.yaml", unet_checkpoint, tmp_path / "out")
    data = yaml.safe_load(cfg.read_text())
    data["tile"]["chunk_tiles"] = 1
    cfg.write_text(yaml.safe_dump(data))
    proc = geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif"))
    wait_for(lambda: proc.poll() is not None or list((tmp_path / "out").glob("*/.geoseg-work/done/infer-*")), 180,
             "inference started on the SLURM worker")
    jobs = [j["id"] for j in slurm.jobs() if j["name"] == "geoseg-out"]
    assert jobs, "no worker job while inferring"
    slurm.command("scancel", *jobs)
    code, err, _ = finished(proc, 300)
    assert code == 0, err
    assert len(re.findall(r"submitted SLURM job", err)) >= 2  # the replacement
    expected = outputs_of(tmp_path / "local", [s.name for s in scenes])
    got = outputs_of(tmp_path / "out", [s.name for s in scenes])
    assert all(np.array_equal(got[n], expected[n]) for n in expected)


def sbatch_nightly(slurm, *args: str, night: str | None = None) -> str:  # noqa: ANN001
    """Submit the shipped nightly job as it is (the environment carries the GEOSEG_* settings); its job id."""
    out = slurm.command("sbatch", "--parsable", *args, str(ROOT / "configs" / "nightly" / "geoseg-nightly.sbatch"),
                        *([night] if night else []), timeout=30)
    return out.stdout.strip().split(";")[0]


def job_exit(slurm, job: str) -> tuple[str, str]:  # noqa: ANN001
    """(state, exit code) of a finished job, from scontrol (accounting is off in the private cluster)."""
    text = slurm.command("scontrol", "show", "job", job, check=False).stdout
    state = re.search(r"JobState=(\S+)", text)
    code = re.search(r"ExitCode=(\d+):\d+", text)
    return (state.group(1) if state else "GONE"), (code.group(1) if code else "")


def test_nightly_sbatch_runs_as_shipped_with_slurm_workers_and_an_empty_night_succeeds(slurm, tmp_path, fcn_checkpoint,
                                                                                      monkeypatch):  # noqa: ANN001
    night = (date.today() - timedelta(days=1)).isoformat()  # the shared definition: yesterday
    scenes_in(tmp_path / "incoming" / night, n=2)
    settings = {"GEOSEG_INCOMING": str(tmp_path / "incoming"), "GEOSEG_OUT": str(tmp_path / "lc"),
                "GEOSEG_SET": f"model={fcn_checkpoint} tile.size=64 tile.overlap=16 vectorize.enabled=false "
                              "evaluate.reference=null cluster.worker_timeout_s=180"}
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("GEOSEG_HOME", raising=False)
    monkeypatch.delenv("GEOSEG_PIPELINE", raising=False)  # the script's default: pipelines/landcover-slurm.yaml
    job = sbatch_nightly(slurm, "-o", str(tmp_path / "job-%j.out"))
    wait_for(lambda: job_exit(slurm, job)[0] not in ("PENDING", "RUNNING", "COMPLETING"), 300, "nightly job done",
             every=1)
    log = (tmp_path / "lc" / "logs" / night / "batch.log").read_text()
    assert job_exit(slurm, job) == ("COMPLETED", "0"), log + (tmp_path / f"job-{job}.out").read_text()
    manifest = json.loads((tmp_path / "lc" / night / "batch.json").read_text())
    assert manifest["ok"] and manifest["counts"] == {"done": 2}
    assert "submitted SLURM job" in log and (tmp_path / "lc" / night / "logs" / "workers").is_dir()

    empty = (date.today() - timedelta(days=2)).isoformat()  # a night without a folder of scenes
    job = sbatch_nightly(slurm, "-o", str(tmp_path / "empty-%j.out"), night=empty)
    wait_for(lambda: job_exit(slurm, job)[0] not in ("PENDING", "RUNNING", "COMPLETING"), 120, "empty night done",
             every=1)
    assert job_exit(slurm, job) == ("COMPLETED", "0")
    assert "no scenes" in (tmp_path / "lc" / "logs" / empty / "batch.log").read_text()


def test_a_walltime_that_expires_mid_batch_then_a_resubmission_finishes_byte_identical(slurm, tmp_path, client,
                                                                                      unet_checkpoint, monkeypatch):  # noqa: ANN001
    night = "2026-11-22"
    paths = scenes_in(tmp_path / "incoming" / night, n=20, shape=(512, 512))  # about 100 s on one core
    pipeline = tmp_path / "local.yaml"
    settings = {"model": str(unet_checkpoint), "output_dir": str(tmp_path / "unused"),
                "tile": {"size": 64, "overlap": 16, "chunk_tiles": 2}, "infer": {"torch_threads": 1},
                "vectorize": {"enabled": True}, "write": {"stac_item": False},
                "cluster": {"n_workers": 1, "threads_per_worker": 1}}
    pipeline.write_text(yaml.safe_dump(settings))
    reference = pipeline_config(paths[0], unet_checkpoint, tmp_path / "reference", **{
        k: v for k, v in settings.items() if k not in ("model", "output_dir", "cluster")})
    assert run_batch(reference, expand_scenes(str(tmp_path / "incoming" / night / "*.tif")), client=client).ok
    for k, v in {"GEOSEG_INCOMING": str(tmp_path / "incoming"), "GEOSEG_OUT": str(tmp_path / "lc"),
                 "GEOSEG_PIPELINE": str(pipeline)}.items():
        monkeypatch.setenv(k, v)
    # A two-minute walltime, warned 50 s before its end: SLURM sends the SIGTERM up to 60 s early, so 10-70 s
    # into the batch (then SIGKILL at the limit if the job were still there).
    job = sbatch_nightly(slurm, "-t", "2", "--signal=B:TERM@50", "-o", str(tmp_path / "cut-%j.out"), night=night)
    wait_for(lambda: job_exit(slurm, job)[0] not in ("PENDING", "RUNNING", "COMPLETING"), 240, "walltime", every=1)
    state, code = job_exit(slurm, job)
    log = (tmp_path / "lc" / "logs" / night / "batch.log").read_text()
    manifest = json.loads((tmp_path / "lc" / night / "batch.json").read_text())
    counts = manifest["counts"]
    # geoseg stops cleanly and the job ends with the wrapper's 130 (FAILED), or SLURM's own limit ends it first
    # (TIMEOUT); either way nothing "failed".
    assert state == "TIMEOUT" or (state, code) == ("FAILED", "130"), (state, code, log)
    assert counts.get("interrupted") and not counts.get("failed"), counts
    assert "exit 130" in log and "Traceback" not in log, log

    job = sbatch_nightly(slurm, "-t", "10", "-o", str(tmp_path / "again-%j.out"), night=night)
    wait_for(lambda: job_exit(slurm, job)[0] not in ("PENDING", "RUNNING", "COMPLETING"), 400, "resubmission",
             every=1)
    assert job_exit(slurm, job) == ("COMPLETED", "0"), (tmp_path / "lc" / "logs" / night / "batch.log").read_text()
    assert statuses_of(tmp_path / "lc" / night) <= {"done", "skipped"}
    for scene in [p.stem for p in paths]:
        for name in ("landcover.tif", "landcover.tif.aux.xml", "landcover.gpkg"):
            assert (tmp_path / "lc" / night / scene / name).read_bytes() == \
                (tmp_path / "reference" / scene / name).read_bytes(), (scene, name)


def statuses_of(batch_dir: Path) -> set[str]:
    return {r["status"] for r in json.loads((batch_dir / "batch.json").read_text())["scenes"]}



def test_a_job_array_shards_the_night_and_merges_one_manifest(slurm, tmp_path, fcn_checkpoint, client):  # noqa: ANN001
    """geoseg batch --submit 2: two array tasks, each a shard with its own local cluster on the node, one
    batch.json with every scene done and --status saying so; the outputs are a one-machine batch's."""
    paths = scenes_in(tmp_path / "in", n=5)
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    local = run_batch(pipeline_config(paths[0], fcn_checkpoint, tmp_path / "local", **COMMON), scenes, client=client)
    assert local.ok
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"model": str(fcn_checkpoint), "output_dir": str(tmp_path / "out"), **COMMON,
                                    "cluster": {"backend": "slurm", "n_workers": 1, "threads_per_worker": 1}}))
    submit = geoseg("batch", str(pipe), "--scenes", str(tmp_path / "in" / "*.tif"), "--submit", "2",
                    "--sbatch", "-c 1 --mem=4G -t 10", "--verbose", env={**os.environ, **slurm.env})
    code, err, took = finished(submit, 60)
    assert code == 0 and took < 30, err
    job = re.search(r"submitted SLURM job array (\d+) \(2 tasks\)", err)
    assert job, err
    array = job.group(1)
    wait_for(lambda: not [j for j in slurm.jobs() if j["id"].startswith(f"{array}_")], 300, "array tasks done",
             every=1)
    logs = sorted((tmp_path / "out" / "logs" / "array").glob("*.out"))
    assert len(logs) == 2, logs
    manifest = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert manifest["state"] == "finished", "\n".join(p.read_text() for p in logs)
    failed = [(r["scene"], r["error"]) for r in manifest["scenes"] if r["status"] != "done"]
    # --verbose: the tasks' logs hold distributed's own lines, those of a worker that died among them
    said = [ln for p in logs for ln in p.read_text().splitlines()
            if re.search(r"nanny|worker process|killed|restart|memory|signal|error|closed", ln, re.I)
            and not re.search(r"^\S+\s\s|bokeh|websocket", ln)]
    assert not failed, "\n".join([str(failed), *said[:80]])
    assert manifest["counts"] == {"done": 5} and [sh["state"] for sh in manifest["shards"]] == ["finished"] * 2
    hosts = {json.loads((tmp_path / "out" / "batch-shards" / f"{k}-of-2.json").read_text())["pid"] for k in (0, 1)}
    assert len(hosts) == 2  # two processes, one per array task
    assert all(np.array_equal(got, want) for got, want in zip(
        outputs_of(tmp_path / "out", [s.name for s in scenes]).values(),
        outputs_of(tmp_path / "local", [s.name for s in scenes]).values()))
    status = subprocess.run([sys.executable, "-m", "geoseg", "batch", "--status", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and ": finished;" in status.stdout and "5 scenes: 5 done" in status.stdout

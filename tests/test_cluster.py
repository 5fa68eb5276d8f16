"""Cluster faults that end clearly and in bounded time, geoseg's own workers, exit codes, failure memory, the
nightly wrapper: on real `dask scheduler` / `geoseg worker` processes (SLURM itself: tests/test_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from geoseg.batch import expand_scenes, run_batch
from geoseg.cli.main import main
from geoseg.errors import ClusterError
from tests.conftest import pipeline_config
from tests.test_batch import outputs_of, scenes_in, statuses
from tests.test_slurm import error_lines, finished, geoseg, wait_for

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"tile": {"size": 64, "overlap": 16}, "vectorize": {"enabled": False}, "write": {"stac_item": False}}


@contextmanager
def scheduler(tmp_path: Path):  # noqa: ANN201
    """A real `dask scheduler` on 127.0.0.1 with no worker; yields its address."""
    sched_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                             "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sched_file.exists, 60, "scheduler up")
        yield json.loads(sched_file.read_text())["address"]
    finally:
        proc.kill()
        proc.wait()


def address_yaml(path: Path, model: Path, out: Path, address: str, **cluster) -> Path:  # noqa: ANN003
    path.write_text(yaml.safe_dump({"model": str(model), "output_dir": str(out), **COMMON,
                                    "cluster": {"backend": "address", "address": address, **cluster}}))
    return path


def test_a_refused_connection_fails_at_once(tmp_path, fcn_checkpoint):  # noqa: ANN001
    scenes_in(tmp_path / "in", n=1)
    cfg = pipeline_config(tmp_path / "in" / "scene0.tif", fcn_checkpoint, tmp_path / "out",
                          cluster={"backend": "address", "address": "tcp://127.0.0.1:9", "timeout_s": 30})
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="tcp://127.0.0.1:9 refused the connection"):
        run_batch(cfg, expand_scenes(str(tmp_path / "in" / "*.tif")))
    assert time.monotonic() - t0 < 5  # not the 30 s timeout


@pytest.mark.slow
def test_a_scheduler_without_workers_times_out_with_a_line_and_sigterm_ends_it(tmp_path, fcn_checkpoint):  # noqa: ANN001
    scenes_in(tmp_path / "in", n=2)
    with scheduler(tmp_path) as address:
        cfg = address_yaml(tmp_path / "a.yaml", fcn_checkpoint, tmp_path / "out", address, worker_timeout_s=8)
        code, err, seconds = finished(geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")), 60)
        lines = error_lines(err)
        assert code == 1 and len(lines) == 1 and "no worker for" in lines[0], err
        assert f"geoseg worker {address}" in lines[0] and 8 <= seconds < 30
        assert "waiting for workers" in err  # the progress line while it waited

        cfg = address_yaml(tmp_path / "b.yaml", fcn_checkpoint, tmp_path / "out2", address, worker_timeout_s=600)
        proc = geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif"))
        wait_for(lambda: (tmp_path / "out2" / ".geoseg.lock").exists() or proc.poll() is not None, 60, "batch started")
        time.sleep(4)  # waiting for a worker now
        proc.send_signal(signal.SIGTERM)
        code, err, seconds = finished(proc, 15)
    assert code == 130 and seconds < 10 and "interrupted" in err, err


@pytest.mark.slow
def test_geoseg_worker_joins_with_geoseg_settings_and_gives_identical_results(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    from distributed import Client

    paths = scenes_in(tmp_path / "in", n=2)
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    assert run_batch(pipeline_config(paths[0], fcn_checkpoint, tmp_path / "local", **COMMON), scenes,
                     client=client).ok
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    with scheduler(tmp_path) as address:
        worker = subprocess.Popen([sys.executable, "-m", "geoseg", "worker", address, "--nthreads", "2", "--gpus", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            with Client(address, timeout="30s") as c:
                c.wait_for_workers(1, timeout=120)
                info = c.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "GDAL_CACHEMAX")})
                assert list(info.values()) == [{"MALLOC_ARENA_MAX": "1", "GDAL_CACHEMAX": "128"}]
                workers = c.scheduler_info()["workers"].values()
                assert [w["resources"] for w in workers] == [{"infer": 2.0}]
                assert c.run(lambda: "torch" in sys.modules) == {w: True for w in info}  # preloaded
            cfg = address_yaml(tmp_path / "a.yaml", fcn_checkpoint, tmp_path / "remote", address)
            code, err, _ = finished(geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")), 180)
            assert code == 0 and "without geoseg's settings" not in err, err
            got, expected = outputs_of(tmp_path / "remote", ["scene0", "scene1"]), outputs_of(tmp_path / "local",
                                                                                           ["scene0", "scene1"])
            assert all(np.array_equal(got[n], expected[n]) for n in expected)
            worker.send_signal(signal.SIGTERM)
            code, _, seconds = finished(worker, 20)
            assert code == 130 and seconds < 20
        finally:
            if worker.poll() is None:
                worker.kill()


@pytest.mark.slow
def test_a_plain_dask_worker_is_warned_about(tmp_path, fcn_checkpoint):  # noqa: ANN001
    scenes_in(tmp_path / "in", n=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    with scheduler(tmp_path) as address:
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                   "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            cfg = address_yaml(tmp_path / "a.yaml", fcn_checkpoint, tmp_path / "out", address)
            code, err, _ = finished(geoseg("batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")), 180)
        finally:
            worker.kill()
            worker.wait()
    assert code == 0, err
    assert "1 of 1 workers run without geoseg's settings" in err and f"geoseg worker {address}" in err


def test_exit_codes_say_done_some_failed_or_nothing_ran(tmp_path, fcn_checkpoint):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in", n=2)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(fcn_checkpoint), "output_dir": str(tmp_path / "out"), **COMMON,
                                   "cluster": {"n_workers": 1, "threads_per_worker": 2}}))
    assert main(["-q", "batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")]) == 0
    paths[1].write_bytes(paths[1].read_bytes()[:500])
    assert main(["-q", "batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")]) == 3
    assert main(["-q", "batch", str(cfg), "--scenes", str(tmp_path / "none" / "*.tif")]) == 1
    assert main(["-q", "batch", str(cfg), "--scenes", str(tmp_path / "none" / "*.tif"), "--allow-empty"]) == 0
    assert main(["-q", "batch", str(tmp_path / "missing.yaml"), "--scenes", str(paths[0])]) == 1


def test_a_scene_whose_input_failed_is_not_retried_until_it_changes(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in", n=2)
    good = paths[1].read_bytes()
    paths[1].write_bytes(good[: len(good) // 3])
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out", **COMMON)
    first = run_batch(cfg, scenes, client=client)
    row = {r.scene: r for r in first.rows}["scene1"]
    assert row.status == "failed" and row.failure == "input"

    again = run_batch(cfg, scenes, client=client)  # the same input: remembered, not run
    row = {r.scene: r for r in again.rows}["scene1"]
    assert statuses(again) == {"scene0": "skipped", "scene1": "failed"}
    assert row.error.startswith("not retried") and row.seconds == 0.0  # never handed to a worker

    assert statuses(run_batch(cfg, scenes, client=client, retry_failed=True))["scene1"] == "failed"  # ran, failed
    time.sleep(0.01)
    paths[1].write_bytes(good)  # fixed: retried, done
    assert statuses(run_batch(cfg, scenes, client=client)) == {"scene0": "skipped", "scene1": "done"}


def test_a_cluster_failure_is_retried_by_the_next_batch(tmp_path, client, fcn_checkpoint, monkeypatch):  # noqa: ANN001
    import geoseg.batch as batch

    paths = scenes_in(tmp_path / "in", n=1)
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out", **COMMON)
    real = batch.run_pipeline

    def lost(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ClusterError("the worker running it was lost")

    monkeypatch.setattr(batch, "run_pipeline", lost)
    row = run_batch(cfg, scenes, client=client).rows[0]
    assert row.status == "failed" and row.failure == "cluster"
    monkeypatch.setattr(batch, "run_pipeline", real)
    assert statuses(run_batch(cfg, scenes, client=client)) == {"scene0": "done"}


def test_a_scene_whose_output_folder_cannot_be_made_fails_in_one_line_and_the_next_rerun_does_it(
        tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    # A file where the scene's folder should be: mkdir fails, also for root (who ignores permission bits).
    paths = scenes_in(tmp_path / "in", n=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scene1").write_text("in the way")
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out", **COMMON)
    row = {r.scene: r for r in run_batch(cfg, scenes, client=client).rows}["scene1"]
    assert row.status == "failed" and row.failure == "output"
    assert re.fullmatch(r"output_dir: cannot create \S+/out/scene1 \(.+\)", row.error), row.error
    (tmp_path / "out" / "scene1").unlink()  # fixed: a plain rerun retries it
    assert statuses(run_batch(cfg, scenes, client=client)) == {"scene0": "skipped", "scene1": "done"}


def test_an_empty_scene_list_is_a_typed_condition(tmp_path):  # noqa: ANN001
    from geoseg.errors import NoScenesError

    with pytest.raises(NoScenesError):
        expand_scenes(str(tmp_path / "nothing" / "*.tif"))
    (tmp_path / "none.txt").write_text("# no scene tonight\n")
    with pytest.raises(NoScenesError):
        expand_scenes(str(tmp_path / "none.txt"))


def nightly(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "configs" / "nightly" / "geoseg-nightly.sh"), *args],
                          env={**os.environ, **env}, timeout=timeout, capture_output=True, text=True)


@pytest.mark.slow
def test_the_nightly_wrapper_picks_up_unfinished_nights_and_an_empty_night_succeeds(tmp_path, fcn_checkpoint):  # noqa: ANN001
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump({"model": str(fcn_checkpoint), "output_dir": str(tmp_path / "unused"),
                                        **COMMON, "cluster": {"n_workers": 1, "threads_per_worker": 2}}))
    env = {"GEOSEG_HOME": str(ROOT), "GEOSEG_PIPELINE": str(pipeline), "GEOSEG_INCOMING": str(tmp_path / "incoming"),
           "GEOSEG_OUT": str(tmp_path / "lc")}
    scenes_in(tmp_path / "incoming" / "2026-11-20", n=2)
    # The night of the 20th was stopped by its time limit after one scene ...
    (tmp_path / "lc" / "2026-11-20").mkdir(parents=True)
    (tmp_path / "lc" / "2026-11-20" / "batch.json").write_text(json.dumps({"ok": False, "scenes": []}))
    # ... the 21st had no scenes at all; the 22nd has one.
    scenes_in(tmp_path / "incoming" / "2026-11-22", n=1)
    done = nightly(env, "2026-11-22")
    assert done.returncode == 0, done.stderr
    for night, count in (("2026-11-20", 2), ("2026-11-22", 1)):
        manifest = json.loads((tmp_path / "lc" / night / "batch.json").read_text())
        assert manifest["ok"] and manifest["counts"] == {"done": count}
        assert "exit 0" in (tmp_path / "lc" / "logs" / night / "batch.log").read_text()
    assert not (tmp_path / "lc" / "2026-11-21").exists()

    again = nightly(env, "2026-11-22")  # finished nights are not queued again; tonight's scenes are skipped
    assert again.returncode == 0
    assert "1 skipped" in (tmp_path / "lc" / "logs" / "2026-11-22" / "batch.log").read_text()
    assert (tmp_path / "lc" / "logs" / "2026-11-20" / "batch.log").read_text().count("night 2026-11-20 exit") == 1

    empty = nightly(env, "2026-11-23")  # a night without scenes is a success
    assert empty.returncode == 0 and "no scenes" in (tmp_path / "lc" / "logs" / "2026-11-23" / "batch.log").read_text()
    bad = nightly(env, "2026-13-45")
    assert bad.returncode == 1 and "YYYY-MM-DD" in bad.stderr


@pytest.mark.slow
def test_the_nightly_wrapper_passes_sigterm_on_and_exits_130(tmp_path, unet_checkpoint):  # noqa: ANN001
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump({"model": str(unet_checkpoint), "output_dir": str(tmp_path / "unused"),
                                        **COMMON, "tile": {"size": 64, "overlap": 16, "chunk_tiles": 1},
                                        "infer": {"torch_threads": 1},
                                        "cluster": {"n_workers": 1, "threads_per_worker": 1}}))
    scenes_in(tmp_path / "incoming" / "2026-11-22", n=3, shape=(512, 512))
    env = {**os.environ, "GEOSEG_HOME": str(ROOT), "GEOSEG_PIPELINE": str(pipeline),
           "GEOSEG_INCOMING": str(tmp_path / "incoming"), "GEOSEG_OUT": str(tmp_path / "lc")}
    proc = subprocess.Popen(["bash", str(ROOT / "configs" / "nightly" / "geoseg-nightly.sh"), "2026-11-22"], env=env)
    wait_for(lambda: list((tmp_path / "lc" / "2026-11-22").glob("*/.geoseg-work/done/infer-*")), 180, "inferring")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    rows = json.loads((tmp_path / "lc" / "2026-11-22" / "batch.json").read_text())["scenes"]
    assert "interrupted" in {r["status"] for r in rows} and "failed" not in {r["status"] for r in rows}


_HELD: list = []


def _hold_until(fraction: float, limit: int) -> float:  # runs on the worker: memory up to fraction x limit, kept
    import psutil

    rss = psutil.Process().memory_info().rss
    _HELD.append(np.ones(max(0, int(fraction * limit) - rss), dtype=np.uint8))
    return psutil.Process().memory_info().rss / limit


def test_a_worker_over_dasks_pause_threshold_keeps_running_tasks():
    """With geoseg's malloc settings memory never falls back, so a paused worker would wait for ever."""
    from geoseg.cluster import open_client
    from geoseg.config import ClusterConfig

    limit = 1024 * 2**20
    with open_client(ClusterConfig(n_workers=1, threads_per_worker=1, memory_limit="1GiB")) as client:
        used = client.submit(_hold_until, 0.87, limit, pure=False).result(timeout=60)
        assert 0.8 < used < 0.95, used  # past Dask's pause threshold, short of the nanny's restart
        time.sleep(1.5)  # the memory monitor runs every 100 ms
        assert client.submit(sum, [1, 2], pure=False).result(timeout=20) == 3
        status = client.run_on_scheduler(lambda dask_scheduler: [w.status.name
                                                                 for w in dask_scheduler.workers.values()])
        assert status == ["running"]

"""`geoseg batch`: many scenes, idempotent, failure-isolated, resumable, on real Dask processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from geoseg.batch import Scene, expand_scenes, run_batch
from geoseg.cli.main import main
from geoseg.errors import ClusterError, InputError
from tests.conftest import make_checkpoint, pipeline_config, write_raster


def scenes_in(folder: Path, n: int = 3, shape: tuple[int, int] = (90, 110)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        rng = np.random.default_rng(k)
        data = np.clip(rng.normal(900, 400, size=(4, *shape)), 1, 5000).astype("uint16")
        paths.append(write_raster(folder / f"scene{k}.tif", data))
    return paths


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def outputs_of(out_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    return {n: read(out_dir / n / "landcover.tif") for n in names}


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each output file of a scene folder but those that name the folder or the time of the run."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in ("run.json", "item.json", "pipeline-config.json")}


def statuses(report) -> dict[str, str]:  # noqa: ANN001
    return {r.scene: r.status for r in report.rows}


def test_second_run_skips_and_exactly_the_changed_scenes_are_redone(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in")
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    assert [s.name for s in scenes] == ["scene0", "scene1", "scene2"]
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out", tile={"size": 64, "overlap": 16},
                          vectorize={"enabled": False})
    first = run_batch(cfg, scenes, client=client)
    assert statuses(first) == {"scene0": "done", "scene1": "done", "scene2": "done"} and first.ok
    manifest = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert manifest["counts"] == {"done": 3} and (tmp_path / "out" / "batch.csv").read_text().startswith("scene,status")
    before = outputs_of(tmp_path / "out", ["scene0", "scene1", "scene2"])

    assert set(statuses(run_batch(cfg, scenes, client=client)).values()) == {"skipped"}
    # where and how fast it runs does not change what it writes
    faster = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"concurrent_scenes": 3}),
                                    "cluster": cfg.cluster.model_copy(update={"n_workers": 2})})
    assert set(statuses(run_batch(faster, scenes, client=client)).values()) == {"skipped"}

    # a changed input redoes that scene only
    fingerprint = lambda name: json.loads((tmp_path / "out" / name / "run.json").read_text())["fingerprint"]  # noqa: E731
    old = {n: fingerprint(n) for n in before}
    time.sleep(0.01)
    data = np.clip(np.random.default_rng(9).normal(900, 400, size=(4, 90, 110)), 1, 5000).astype("uint16")
    write_raster(paths[1], data)
    assert statuses(run_batch(cfg, scenes, client=client)) == {"scene0": "skipped", "scene1": "done",
                                                                "scene2": "skipped"}
    assert {n: fingerprint(n) != old[n] for n in before} == {"scene0": False, "scene1": True, "scene2": False}

    # a setting that changes the outputs, or another model, redoes every scene
    wider = cfg.model_copy(update={"tile": cfg.tile.model_copy(update={"overlap": 24})})
    assert set(statuses(run_batch(wider, scenes, client=client)).values()) == {"done"}
    other_model = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    assert set(statuses(run_batch(wider.model_copy(update={"model": other_model}), scenes,
                                  client=client)).values()) == {"done"}
    assert set(statuses(run_batch(wider.model_copy(update={"model": other_model}), scenes, client=client,
                                  force=True)).values()) == {"done"}


def test_one_corrupt_scene_fails_alone_with_a_clear_message(tmp_path, fcn_checkpoint, capsys):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in")
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[: len(raw) // 3])  # valid header, truncated data
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(fcn_checkpoint), "output_dir": str(tmp_path / "out"),
        "tile": {"size": 64, "overlap": 16}, "vectorize": {"enabled": False},
        "cluster": {"n_workers": 1, "threads_per_worker": 2},
    }))
    code = main(["-q", "batch", str(cfg), "--scenes", str(tmp_path / "in" / "*.tif")])
    assert code == 3  # some scenes failed (1 is for "nothing could run")
    manifest = json.loads((tmp_path / "out" / "batch.json").read_text())
    rows = {r["scene"]: r for r in manifest["scenes"]}
    assert manifest["counts"] == {"done": 2, "failed": 1} and manifest["ok"] is False
    assert rows["scene1"]["status"] == "failed" and "scene1.tif" in rows["scene1"]["error"]
    assert "\n" not in rows["scene1"]["error"]
    assert (tmp_path / "out" / "scene0" / "landcover.tif").exists()
    assert not (tmp_path / "out" / "scene1" / "landcover.tif").exists()
    assert "2 done, 1 failed" in capsys.readouterr().err


@contextmanager
def dask_processes(tmp_path: Path, n_workers: int = 2):
    """A real `dask scheduler` and `dask worker` processes on 127.0.0.1 (no nanny: a killed worker stays dead)."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)], **quiet)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        for k in range(n_workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"w{k}"],
                                          **quiet))
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(n_workers, timeout=60)
        yield address, procs[1:]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_real_scheduler_and_workers_survive_a_killed_worker(tmp_path, client, unet_checkpoint):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in", shape=(320, 288))
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    common = {"tile": {"size": 64, "overlap": 16, "chunk_tiles": 1}, "infer": {"torch_threads": 1},
              "write": {"confidence": "uint8"}, "vectorize": {"block": 64}}
    local = run_batch(pipeline_config(paths[0], unet_checkpoint, tmp_path / "local", **common), scenes,
                      client=client)
    assert local.ok
    expected = outputs_of(tmp_path / "local", [s.name for s in scenes])
    written = {s.name: file_digests(tmp_path / "local" / s.name) for s in scenes}

    with dask_processes(tmp_path) as (address, workers):
        remote = pipeline_config(paths[0], unet_checkpoint, tmp_path / "remote", **common,
                                 cluster={"backend": "address", "address": address})
        report = run_batch(remote, scenes)
        assert statuses(report) == {s.name: "done" for s in scenes}
        # Written on the two workers (write.on_workers is on for a scheduler's address) and streamed to the
        # one client for the local batch: the same bytes in every output file.
        assert {s.name: file_digests(tmp_path / "remote" / s.name) for s in scenes} == written
        assert all(json.loads((tmp_path / n / s.name / "pipeline-config.json").read_text())["write"]["on_workers"]
                   == "auto" for n in ("local", "remote") for s in scenes)

        # again, killing one worker once inference has started: its tasks are redone on the other
        killed = tmp_path / "killed"
        runner = threading.Thread(target=lambda: results.append(run_batch(
            remote.model_copy(update={"output_dir": killed}), scenes)))
        results: list = []
        runner.start()
        deadline = time.time() + 120
        while not list(killed.glob("*/.geoseg-work/done/infer-*")) and time.time() < deadline:
            time.sleep(0.05)
        workers[0].send_signal(signal.SIGKILL)
        runner.join(timeout=300)
        assert results and statuses(results[0]) == {s.name: "done" for s in scenes}
        got = outputs_of(killed, [s.name for s in scenes])
        assert all(np.array_equal(got[n], expected[n]) for n in expected)


def test_unreachable_scheduler_fails_fast(tmp_path, fcn_checkpoint):  # noqa: ANN001
    paths = scenes_in(tmp_path / "in", n=1)
    t0 = time.time()
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out",
                          cluster={"backend": "address", "address": "tcp://127.0.0.1:9", "timeout_s": 30})
    with pytest.raises(ClusterError, match="refused the connection: no scheduler listens there"):
        run_batch(cfg, expand_scenes(str(paths[0])))
    assert time.time() - t0 < 10, "a refused connection is final: no waiting out the timeout"
    # A port that accepts connections but never speaks dask's protocol waits out the timeout, then says so.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out2",
                              cluster={"backend": "address", "address": address, "timeout_s": 2})
        t0 = time.time()
        with pytest.raises(ClusterError, match=f"cannot reach scheduler {address} within 2s"):
            run_batch(cfg, expand_scenes(str(paths[0])))
        assert time.time() - t0 < 20


def _geoseg(*args: str, **kwargs) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen([sys.executable, "-m", "geoseg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.mark.slow
def test_interrupted_run_resumes_from_finished_chunks(tmp_path, unet_checkpoint):  # noqa: ANN001
    from geoseg.sample import make_sample

    scene = make_sample(tmp_path / "in", 512, seed=3).image
    settings = {"model": str(unet_checkpoint), "tile": {"size": 64, "overlap": 16, "chunk_tiles": 1},
                "infer": {"torch_threads": 1}, "vectorize": {"enabled": False},
                "cluster": {"n_workers": 1, "threads_per_worker": 1}}

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**settings, "input": str(scene), "output_dir": str(tmp_path / name)}))
        return path

    whole = _geoseg("-q", "run", str(config("whole")))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    proc = _geoseg("-q", "run", str(config("cut")))
    done = tmp_path / "cut" / ".geoseg-work" / "done"
    deadline = time.time() + 120
    while len(list(done.glob("infer-*"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert "interrupted" in proc.stderr.read()
    assert not (tmp_path / "cut" / "landcover.tif").exists()
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "interrupted"

    again = _geoseg("-q", "run", str(config("cut")))
    assert again.wait(timeout=300) == 0, again.stderr.read()
    stats = json.loads((tmp_path / "cut" / "run.json").read_text())["stats"]
    total = stats["chunks"][0] * stats["chunks"][1]
    assert stats["chunks_resumed"] >= 5 and stats["chunks_inferred"] == total - stats["chunks_resumed"] < total
    assert np.array_equal(read(tmp_path / "cut" / "landcover.tif"), read(tmp_path / "whole" / "landcover.tif"))
    assert not (tmp_path / "cut" / ".geoseg-work").exists()


@pytest.mark.parametrize("backend,directives", [
    ("slurm", ["#SBATCH -p gpu", "#SBATCH -A eo-nightly", "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:1",
               "#SBATCH --cpus-per-task=8", "#SBATCH --qos=night"]),
    ("pbs", ["#PBS -q gpu", "#PBS -A eo-nightly", "#PBS -l walltime=04:00:00",
             "#PBS -l select=1:ncpus=8:ngpus=1:mem=32gb", "#PBS --qos=night"]),
])
def test_jobqueue_backends_render_the_expected_job_script(backend, directives, tmp_path):  # noqa: ANN001
    from geoseg.config import ClusterConfig
    from geoseg.hpc import jobqueue_cluster

    cfg = ClusterConfig(backend=backend, jobqueue={
        "queue": "gpu", "account": "eo-nightly", "cores": 8, "memory": "32GiB", "walltime": "04:00:00", "gpus": 1,
        "job_extra_directives": ["--qos=night"], "job_script_prologue": ["source /opt/geoseg/.venv/bin/activate"]})
    cluster, _ = jobqueue_cluster(cfg, name="geoseg-2026-11-30", log_directory=str(tmp_path / "logs"))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in directives:
        assert any(s.startswith(line) for s in script.splitlines()), (line, script)
    worker = script.strip().splitlines()[-1]
    assert "--resources GPU=1,infer=1" in worker and "--nthreads 1" in worker
    assert "export MALLOC_ARENA_MAX=1" in script and "source /opt/geoseg/.venv/bin/activate" in script
    assert "geoseg-2026-11-30" in script and (tmp_path / "logs").is_dir()  # the batch's name, logs it created


def test_jobqueue_backend_without_dask_jobqueue_says_what_to_install(monkeypatch):  # noqa: ANN001
    from geoseg.config import ClusterConfig
    from geoseg.hpc import jobqueue_cluster

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ClusterError, match=r"pip install 'geoseg\[slurm\]'"):
        jobqueue_cluster(ClusterConfig(backend="slurm"))


def test_stac_item_collection_as_scene_list(tmp_path):  # noqa: ANN001
    paths = scenes_in(tmp_path / "data", n=2)
    items = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "S2A 2026-11-20", "properties": {"datetime": "2026-11-20T10:31:00Z"},
         "assets": {"image": {"href": "data/scene0.tif"}}, "links": []},
        {"type": "Feature", "id": "S2B/2026-11-21", "properties": {"datetime": "2026-11-21T10:31:00Z"},
         "assets": {"image": {"href": paths[1].absolute().as_uri()}}, "links": []},
    ]}
    spec = tmp_path / "items.json"
    spec.write_text(json.dumps(items))
    scenes = expand_scenes(str(spec))
    assert [s.name for s in scenes] == ["S2A_2026-11-20", "S2B_2026-11-21"]
    assert [s.path for s in scenes] == [paths[0].absolute(), paths[1].absolute()]
    assert scenes[0].source["datetime"] == "2026-11-20T10:31:00Z"
    with pytest.raises(InputError, match="has no asset 'visual' \\(batch.stac_asset\\); it has: image"):
        expand_scenes(str(spec), "visual")
    items["features"][0]["assets"]["image"]["href"] = "https://example.com/scene.tif"
    spec.write_text(json.dumps(items))
    with pytest.raises(InputError, match="is remote"):
        expand_scenes(str(spec))
    spec.write_text("{not json")
    with pytest.raises(InputError, match="not a STAC Item or ItemCollection"):
        expand_scenes(str(spec))


def test_each_scene_gets_a_stac_item_describing_its_outputs(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    from rasterio.warp import transform_bounds

    from geoseg.sample import CLASSES

    paths = scenes_in(tmp_path / "in", n=1)
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out", tile={"size": 64, "overlap": 16},
                          write={"confidence": "uint8"})
    source = {"id": "S2A-1", "datetime": "2026-11-20T10:31:00Z", "href": "https://stac.example/items/S2A-1"}
    run_batch(cfg, [Scene("S2A-1", paths[0], source)], client=client)
    item = json.loads((tmp_path / "out" / "S2A-1" / "item.json").read_text())
    assert item["type"] == "Feature" and item["id"] == "S2A-1" and item["properties"]["datetime"] == source["datetime"]
    assert item["properties"]["proj:code"] == "EPSG:32632" and item["properties"]["proj:shape"] == [90, 110]
    with rasterio.open(paths[0]) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    assert np.allclose(item["bbox"], [west, south, east, north], atol=1e-6)
    land = item["assets"]["landcover"]
    assert land["href"] == "./landcover.tif" and "cloud-optimized" in land["type"]
    table = {c["value"]: c for c in land["classification:classes"]}
    assert [table[c["id"]]["title"] for c in CLASSES] == [c["name"] for c in CLASSES]
    assert table[255].get("nodata") is True and table[1]["color_hint"] == CLASSES[0]["color"].lstrip("#").upper()
    assert {"confidence", "vector", "manifest"} <= set(item["assets"])
    for asset in item["assets"].values():
        assert (tmp_path / "out" / "S2A-1" / asset["href"]).exists()
    assert item["links"][0] == {"rel": "derived_from", "href": source["href"], "type": "application/geo+json"}


@pytest.mark.slow
def test_nightly_script_runs_the_batch_with_a_log_per_night(tmp_path, fcn_checkpoint):  # noqa: ANN001
    root = Path(__file__).resolve().parents[1]
    scenes_in(tmp_path / "incoming" / "2026-11-22", n=2)
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump({
        "model": str(fcn_checkpoint), "output_dir": str(tmp_path / "unused"), "tile": {"size": 64, "overlap": 16},
        "vectorize": {"enabled": False}, "cluster": {"n_workers": 1, "threads_per_worker": 2}}))
    env = {**os.environ, "GEOSEG_HOME": str(root), "GEOSEG_PIPELINE": str(pipeline),
           "GEOSEG_SCENES": str(tmp_path / "incoming" / "2026-11-22" / "*.tif"), "GEOSEG_OUT": str(tmp_path / "lc")}
    done = subprocess.run(["bash", str(root / "configs" / "nightly" / "geoseg-nightly.sh"), "2026-11-22"], env=env,
                          timeout=300)
    assert done.returncode == 0
    assert "2 done" in (tmp_path / "lc" / "logs" / "2026-11-22" / "batch.log").read_text()
    manifest = json.loads((tmp_path / "lc" / "2026-11-22" / "batch.json").read_text())
    assert manifest["ok"] and [r["scene"] for r in manifest["scenes"]] == ["scene0", "scene1"]


def test_the_manifest_shows_the_night_while_it_runs(tmp_path, client, fcn_checkpoint, monkeypatch):  # noqa: ANN001
    """batch.json/.csv are rewritten as scenes finish: a scene starting sees the ones before it done, itself
    running and the rest pending; --status summarises it."""
    import geoseg.batch as batch
    from geoseg.batch import batch_status

    paths = scenes_in(tmp_path / "in", n=3)
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out", tile={"size": 64, "overlap": 16},
                          vectorize={"enabled": False}, batch={"concurrent_scenes": 1})
    monkeypatch.setattr(batch, "MANIFEST_EVERY_S", 0.0)
    seen: list[dict[str, str]] = []
    real = batch.run_pipeline

    def watching(scene_cfg, **kw):  # noqa: ANN001, ANN003
        time.sleep(0.2)  # the batch loop's wait ends within MANIFEST_EVERY_S: it has rewritten the manifest
        data = json.loads((tmp_path / "out" / "batch.json").read_text())
        assert data["state"] == "running" and data["pid"] == os.getpid()
        seen.append({r["scene"]: r["status"] for r in data["scenes"]})
        with open(tmp_path / "out" / "batch.csv") as f:
            assert [r["status"] for r in csv.DictReader(f)] == list(seen[-1].values())
        return real(scene_cfg, **kw)

    monkeypatch.setattr(batch, "run_pipeline", watching)
    report = run_batch(cfg, scenes)
    names = [s.name for s in scenes]
    assert seen[0] == dict(zip(names, ["running", "pending", "pending"]))
    assert seen[1] == dict(zip(names, ["done", "running", "pending"]))
    assert seen[2] == dict(zip(names, ["done", "done", "running"]))
    final = json.loads(report.path.read_text())
    assert final["state"] == "finished" and final["counts"] == {"done": 3}
    assert all(r["started"] for r in final["scenes"])
    status = batch_status(tmp_path / "out")
    assert status.splitlines()[0].endswith(final["updated"]) and ": finished;" in status
    assert "3 scenes: 3 done" in status and status.count("slowest") == 3


@pytest.mark.slow
def test_a_sigkilled_batch_leaves_a_true_record(tmp_path, fcn_checkpoint):  # noqa: ANN001
    """kill -9 of the client mid-batch: the manifest on disk still parses, holds the scenes finished so far,
    and --status says the batch is gone; the rerun finishes the rest."""
    paths = scenes_in(tmp_path / "in", n=8, shape=(400, 430))
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({
        "model": str(fcn_checkpoint), "output_dir": str(tmp_path / "out"), "tile": {"size": 64, "overlap": 16},
        "vectorize": {"enabled": False}, "batch": {"concurrent_scenes": 1},
        "cluster": {"n_workers": 1, "threads_per_worker": 1}}))
    cmd = [sys.executable, "-m", "geoseg", "-q", "batch", str(pipe), "--scenes", str(tmp_path / "in" / "*.tif")]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    manifest = tmp_path / "out" / "batch.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            try:
                if json.loads(manifest.read_text())["counts"].get("done", 0) >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    data = json.loads(manifest.read_text())
    assert data["state"] == "running" and 1 <= data["counts"]["done"] < len(paths)
    for r in data["scenes"]:
        assert r["status"] in ("done", "running", "pending")
        assert (r["status"] == "done") == (Path(r["output_dir"]) / "run.json").exists()
    status = subprocess.run([*cmd[:4], "batch", "--status", str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and "stopped before it finished" in status.stdout, status
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    k = data["counts"]["done"]
    assert json.loads(manifest.read_text())["counts"] == {"skipped": k, "done": len(paths) - k}


def test_auto_concurrency_keeps_every_inference_slot_busy(tmp_path, fcn_checkpoint):  # noqa: ANN001
    from geoseg.batch import MAX_CONCURRENT_SCENES, concurrent_scenes

    class Scheduler:
        def __init__(self, workers: list[dict]) -> None:
            self.workers = workers

        def scheduler_info(self) -> dict:
            return {"workers": {f"tcp://w{k}": w for k, w in enumerate(self.workers)}}

    gpus = Scheduler([{"nthreads": 1, "resources": {"GPU": 1, "infer": 1}}] * 8)
    cpus = Scheduler([{"nthreads": 4, "resources": {"infer": 2}}] * 3)
    plain = Scheduler([{"nthreads": 3}])
    x = scenes_in(tmp_path, n=1)[0]
    cfg = pipeline_config(x, fcn_checkpoint, tmp_path / "out")
    assert [concurrent_scenes(cfg, c) for c in (gpus, cpus, plain, Scheduler([]))] == [9, 7, 4, 2]
    assert concurrent_scenes(cfg, Scheduler([{"nthreads": 1, "resources": {"infer": 1}}] * 1000)) == \
        MAX_CONCURRENT_SCENES
    # an adaptive SLURM cluster: planned from its most jobs, before they have joined
    slurm = pipeline_config(x, fcn_checkpoint, tmp_path / "out", cluster={
        "backend": "slurm", "jobqueue": {"maximum_jobs": 5, "gpus": 1}})
    assert concurrent_scenes(slurm, Scheduler([])) == 6
    fixed = pipeline_config(x, fcn_checkpoint, tmp_path / "out", batch={"concurrent_scenes": 3})
    assert concurrent_scenes(fixed, gpus) == 3


def test_shards_of_one_batch_merge_into_one_manifest(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    """--shard K/N runs scenes K, K+N, ...; two shards at once fill one batch.json, and the outputs are the
    unsharded batch's."""
    from geoseg.batch import batch_status

    paths = scenes_in(tmp_path / "in", n=5)
    scenes = expand_scenes(str(tmp_path / "in" / "*.tif"))
    names = [s.name for s in scenes]
    common = {"tile": {"size": 64, "overlap": 16}, "vectorize": {"enabled": False}}
    whole = run_batch(pipeline_config(paths[0], fcn_checkpoint, tmp_path / "whole", **common), scenes, client=client)
    cfg = pipeline_config(paths[0], fcn_checkpoint, tmp_path / "out", **common)

    first = run_batch(cfg, scenes, client=client, shard=(0, 2))
    assert [r.scene for r in first.rows] == names[0::2] and first.ok
    merged = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert merged["state"] == "running" and [r["scene"] for r in merged["scenes"]] == names
    assert [r["status"] for r in merged["scenes"]] == ["done", "pending", "done", "pending", "done"]
    assert merged["shards"][1] == {"shard": "1/2", "state": "pending"}
    status = batch_status(tmp_path / "out")
    assert "running: 0 of 2 shards at work" in status and "shard 1/2: not started yet" in status

    # both shards at once (the second finds the first's scenes done and skips them)
    results: list = []
    threads = [threading.Thread(target=lambda k=k: results.append(run_batch(cfg, scenes, client=client,
                                                                            shard=(k, 2)))) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 2 and all(r.ok for r in results)
    merged = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert merged["state"] == "finished" and merged["counts"] == {"skipped": 3, "done": 2}
    assert [sh["state"] for sh in merged["shards"]] == ["finished", "finished"]
    with open(tmp_path / "out" / "batch.csv") as f:
        assert [r["scene"] for r in csv.DictReader(f)] == names
    assert all(np.array_equal(read(tmp_path / "out" / n / "landcover.tif"), read(tmp_path / "whole" / n /
                                                                                 "landcover.tif")) for n in names)
    assert whole.ok and ": finished;" in batch_status(tmp_path / "out")


def test_submit_writes_a_job_array_whose_tasks_run_their_shard(tmp_path, fcn_checkpoint, monkeypatch):  # noqa: ANN001
    """--submit N: sbatch gets one array of N tasks with the --sbatch options; the script it gets, run as
    array task 1 would run it, runs shard 1 of N (a real run, no SLURM needed)."""
    scenes_in(tmp_path / "in", n=3)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "sbatch.args"}\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"model": str(fcn_checkpoint), "output_dir": str(tmp_path / "out"),
                                    "tile": {"size": 64, "overlap": 16}, "vectorize": {"enabled": False},
                                    "cluster": {"n_workers": 1, "threads_per_worker": 1}}))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "geoseg", "batch", str(pipe), "--scenes", str(tmp_path / "in" / "*.tif")]
    done = subprocess.run([*cmd, "--submit", "3", "--sbatch", "-p gpu --gres=gpu:1"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert f"submitted SLURM job array 4242 (3 tasks); progress: geoseg batch --status {tmp_path / 'out'}" in done.stderr
    args = (tmp_path / "sbatch.args").read_text().split()
    assert args[:4] == ["--parsable", "-p", "gpu", "--gres=gpu:1"]
    script = Path(args[-1])
    text = script.read_text()
    assert script.parent == tmp_path / "out" / "logs" / "array" and "#SBATCH --array=0-2" in text
    assert '--shard "${SLURM_ARRAY_TASK_ID}/3"' in text and "cluster.backend=local" in text
    assert not (tmp_path / "out" / "batch.json").exists()  # submitting runs nothing

    task = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300,
                          env={**env, "SLURM_ARRAY_TASK_ID": "1"})
    assert task.returncode == 0, task.stderr
    merged = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert [r["status"] for r in merged["scenes"]] == ["pending", "done", "pending"]
    assert [sh["state"] for sh in merged["shards"]] == ["pending", "finished", "pending"]

"""A run is a transaction: all outputs or none, one run per folder, a resume that never poisons itself.

The crash tests run `geoseg run` in a child process against a real `dask scheduler` with a worker, kill the
child with SIGKILL at named moments (``GEOSEG_KILL_AT``, :mod:`geoseg._faults`), rerun, and compare every
output byte for byte with a clean run's (``run.json`` and ``item.json`` record times and are left out).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from geoseg.pipeline import outputs
from geoseg.transaction import JOURNAL, LOCK, STAGE, FolderLock, FolderLockedError, _process_start
from tests.conftest import pipeline_config, write_raster
from tests.test_batch import dask_processes

STAMPED = {"run.json", "item.json"}  # they say when: not byte-identical by design
KILL_POINTS = ["setup", "scratch", "infer", "segmented", "write", "vectorize", "evaluate", "journal", "commit",
               "published"]


def geoseg(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geoseg", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every output file under ``folder`` (relative names); time-stamped records and geoseg's own
    hidden work files left out (:func:`leftovers` checks those)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in STAMPED
            and not p.relative_to(folder).parts[0].startswith(".")}


def leftovers(folder: Path) -> list[str]:
    """Hidden files and folders of geoseg's own that a finished run must not leave."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    with dask_processes(tmp_path_factory.mktemp("sched"), n_workers=1) as (address, _):
        yield address


@pytest.fixture(scope="module")
def crash_case(tmp_path_factory, fcn_checkpoint, scheduler):
    """A pipeline writing every kind of output into one folder, and the digests of its clean run there.

    Outputs name their folder (pipeline-config.json, the report), so every run of these tests uses the same
    folder (emptied first) and compares with the clean run in it.
    """
    import shutil

    from geoseg.sample import make_sample

    root = tmp_path_factory.mktemp("crash")
    sample = make_sample(root / "in", 200, seed=7, width=230)
    out = root / "out"

    def config() -> Path:
        path = root / "pipe.yaml"
        path.write_text(yaml.safe_dump({
            "input": str(sample.image), "model": str(fcn_checkpoint), "output_dir": str(out),
            "tile": {"size": 64, "overlap": 16, "chunk_tiles": 1}, "infer": {"device": "cpu", "torch_threads": 1},
            "write": {"confidence": "uint8", "keep_scores": True},
            "vectorize": {"min_area_px": 3, "block": 64}, "evaluate": {"reference": str(sample.labels)},
            "cluster": {"backend": "address", "address": scheduler}}))
        shutil.rmtree(out, ignore_errors=True)
        return path

    done = geoseg("run", str(config()))
    assert done.returncode == 0, done.stderr
    return config, out, digests(out)


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_any_moment_then_rerun_gives_the_same_bytes(crash_case, point):
    config, out, expected = crash_case
    cfg = config()
    killed = geoseg("run", str(cfg), env={"GEOSEG_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr)
    if point not in ("journal", "commit", "published"):  # before the commit point nothing is published
        assert not (out / "landcover.tif").exists() and not (out / "run.json").exists()
    again = geoseg("run", str(cfg))
    assert again.returncode == 0, (point, again.stderr)
    assert digests(out) == expected, point
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert leftovers(out) == []


def test_a_second_run_into_the_same_folder_fails_at_once_naming_the_holder(crash_case):
    config, out, expected = crash_case
    cfg = config()
    first = subprocess.Popen([sys.executable, "-m", "geoseg", "-q", "run", str(cfg)], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lock = out / LOCK
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.time()
    second = geoseg("run", str(cfg), timeout=60)
    assert time.time() - t0 < 20
    assert second.returncode == 1
    line = second.stderr.strip()
    assert "\n" not in line and f"pid {first.pid}" in line and "another geoseg run is using this folder" in line
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert digests(out) == expected and leftovers(out) == []


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": "1",
                                             "started": "2026-11-30T01:00:00+00:00", "what": "run"}))
    with FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "took over the lock of a run that is gone" in caplog.text and not (tmp_path / LOCK).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": alive.pid,
                                                 "start": _process_start(alive.pid), "started": "now"}))
        with pytest.raises(FolderLockedError, match=rf"pid {alive.pid}"):
            FolderLock(tmp_path).acquire()
    finally:
        alive.kill()
        alive.wait()


def test_a_reused_pid_is_not_a_live_holder(tmp_path):
    """Same PID, another process (its start time differs): the lock is stale."""
    (tmp_path / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "start": "-1",
                                             "started": "yesterday"}))
    with FolderLock(tmp_path):
        pass


def test_interrupt_before_the_commit_publishes_nothing_and_the_rerun_is_not_refused(crash_case):
    config, out, expected = crash_case
    cfg = config()
    proc = subprocess.Popen([sys.executable, "-m", "geoseg", "-q", "run", str(cfg)], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    staged = out / STAGE / "landcover.tif"
    deadline = time.time() + 120
    while not staged.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130 and "interrupted" in proc.stderr.read()
    assert not (out / "landcover.tif").exists() and not (out / "landcover.qml").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    again = geoseg("run", str(cfg))
    assert again.returncode == 0, again.stderr
    assert digests(out) == expected


def test_a_run_failing_late_leaves_the_previous_outputs_as_they_were(tmp_path, client, fcn_checkpoint, sample_scene,
                                                                     monkeypatch):
    """A failure in a late stage (here the writing of the reports) publishes nothing: the old run stays whole."""
    import geoseg.report
    from geoseg.pipeline import run_pipeline

    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16},
                          evaluate={"reference": str(sample_scene.labels)})
    run_pipeline(cfg, client=client)
    before = digests(tmp_path / "o")
    manifest = (tmp_path / "o" / "run.json").read_bytes()

    def broken(*a, **k):
        raise OSError(28, "No space left on device", "report.md")

    monkeypatch.setattr(geoseg.report, "write_reports", broken)
    other = cfg.model_copy(update={"overwrite": True, "tile": cfg.tile.model_copy(update={"overlap": 24})})
    with pytest.raises(OSError):
        run_pipeline(other, client=client)
    assert digests(tmp_path / "o") == before and (tmp_path / "o" / "run.json").read_bytes() == manifest
    attempt = json.loads((tmp_path / "o" / ".geoseg-work" / "run.json").read_text())
    assert attempt["status"] == "failed" and "No space left" in attempt["error"]


def test_a_bad_vector_reference_fails_before_any_work_and_the_fixed_rerun_runs(tmp_path, client, fcn_checkpoint,
                                                                               sample_scene, monkeypatch):
    import geopandas as gpd
    from shapely.geometry import box

    import geoseg.segment
    from geoseg.errors import InputError
    from geoseg.pipeline import run_pipeline

    ref = tmp_path / "ref.gpkg"
    gpd.GeoDataFrame({"code": [1]}, geometry=[box(500000, 4997000, 501000, 5000000)], crs="EPSG:32631").to_file(ref)
    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16},
                          evaluate={"reference": str(ref)})
    real = geoseg.segment.segment_scene
    monkeypatch.setattr(geoseg.segment, "segment_scene", lambda *a, **k: pytest.fail("segmented first"))
    with pytest.raises(InputError, match="ref.gpkg: no attribute 'class'; available: code"):
        run_pipeline(cfg, client=client)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pipeline-config.json", "run.json"]
    monkeypatch.setattr(geoseg.segment, "segment_scene", real)
    fixed = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"attribute": "code"})})
    assert run_pipeline(fixed, client=client).landcover.exists()


def test_only_the_files_a_run_writes_are_guarded_and_touched(tmp_path, client, fcn_checkpoint, sample_scene):
    from geoseg.errors import OutputExistsError
    from geoseg.pipeline import run_pipeline

    out = tmp_path / "o"
    out.mkdir()
    (out / "confidence.tif").write_bytes(b"yesterday's confidence, from another configuration")
    (out / "notes.txt").write_text("mine")
    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, out, tile={"size": 64, "overlap": 16},
                          vectorize={"enabled": False})
    assert "confidence.tif" not in outputs(cfg)
    run_pipeline(cfg, client=client)  # not refused because of a file it does not write
    assert (out / "confidence.tif").read_bytes().startswith(b"yesterday") and (out / "notes.txt").read_text() == "mine"
    assert set(p.name for p in out.iterdir()) == {*outputs(cfg), "confidence.tif", "notes.txt"}

    own = tmp_path / "p"
    own.mkdir()
    (own / "landcover.qml").write_text("<qgis>my own style</qgis>")
    with pytest.raises(OutputExistsError, match="landcover.qml: exists"):
        run_pipeline(cfg.model_copy(update={"output_dir": own}), client=client)
    assert (own / "landcover.qml").read_text() == "<qgis>my own style</qgis>"


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, client, fcn_checkpoint):
    from geoseg.errors import OutputWriteError
    from geoseg.pipeline import run_pipeline

    data = np.full((4, 30, 30), 900, dtype="uint16")
    scene = write_raster(tmp_path / "landcover.tif", data)
    before = scene.read_bytes()
    cfg = pipeline_config(scene, fcn_checkpoint, tmp_path, tile={"size": 32, "overlap": 8}, overwrite=True)
    with pytest.raises(OutputWriteError, match=r"landcover.tif would replace the run's input"):
        run_pipeline(cfg, client=client)
    assert scene.read_bytes() == before
    ref_cfg = pipeline_config(write_raster(tmp_path / "scene.tif", data), fcn_checkpoint, tmp_path / "out",
                              tile={"size": 32, "overlap": 8}, overwrite=True,
                              evaluate={"reference": str(write_raster(tmp_path / "out.tif", data[0]))})
    (tmp_path / "out").mkdir()
    os.replace(tmp_path / "out.tif", tmp_path / "out" / "metrics.json")
    with pytest.raises(OutputWriteError, match=r"metrics.json would replace the run's evaluate.reference"):
        run_pipeline(ref_cfg.model_copy(update={"evaluate": ref_cfg.evaluate.model_copy(
            update={"reference": tmp_path / "out" / "metrics.json"})}), client=client)


def test_an_input_that_changes_during_the_run_fails_it(tmp_path, client, fcn_checkpoint, monkeypatch):
    import geoseg.write
    from geoseg.errors import InputError
    from geoseg.pipeline import run_pipeline

    scene = write_raster(tmp_path / "s.tif", np.full((4, 40, 40), 900, dtype="uint16"))
    real = geoseg.write.write_qgis_style

    def touch_input(*a, **k):
        os.utime(scene, (time.time() + 5, time.time() + 5))  # another process rewrote it meanwhile
        return real(*a, **k)

    monkeypatch.setattr(geoseg.write, "write_qgis_style", touch_input)
    cfg = pipeline_config(scene, fcn_checkpoint, tmp_path / "o", tile={"size": 32, "overlap": 8})
    with pytest.raises(InputError, match="s.tif: changed while it was being segmented"):
        run_pipeline(cfg, client=client)
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "failed"
    assert not (tmp_path / "o" / "landcover.tif").exists()


def test_a_half_done_commit_is_completed_by_the_next_run(tmp_path, client, fcn_checkpoint, sample_scene):
    """The journal exists and some outputs are already in place: the rerun finishes publishing, then reports."""
    from geoseg.pipeline import run_pipeline
    from geoseg.transaction import Stage

    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "ref", tile={"size": 64, "overlap": 16})
    run_pipeline(cfg, client=client)
    expected = digests(tmp_path / "ref")
    out = tmp_path / "o"
    half = cfg.model_copy(update={"output_dir": out})
    stage = Stage(out)
    out.mkdir()
    staged = stage.create()
    for name in outputs(half):  # a finished run's staged files, its journal, and two outputs already moved
        src = tmp_path / "ref" / name
        (staged / name).write_bytes(src.read_bytes())
    (out / JOURNAL).write_text(json.dumps({"names": outputs(half)}))
    for name in outputs(half)[:2]:
        os.replace(staged / name, out / name)
    from geoseg.fingerprint import output_fingerprint

    assert json.loads((out / JOURNAL).read_text()) and output_fingerprint(half) == output_fingerprint(cfg)
    result = run_pipeline(half, client=client)
    assert result.landcover == out / "landcover.tif" and digests(out) == expected and leftovers(out) == []


def test_overwrite_always_redoes_the_run(tmp_path, client, fcn_checkpoint, sample_scene, monkeypatch):
    import geoseg.segment
    from geoseg.pipeline import run_pipeline

    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16},
                          vectorize={"enabled": False}, overwrite=True)
    run_pipeline(cfg, client=client)
    calls = []
    real = geoseg.segment.segment_scene
    monkeypatch.setattr(geoseg.segment, "segment_scene", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_pipeline(cfg, client=client)
    assert calls == [1]  # --overwrite: done again, not "nothing to do"

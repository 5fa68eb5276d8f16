"""The CLI: thin commands, one-line errors with non-zero exit codes, tracebacks only with --verbose."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from geoseg import __version__
from geoseg.cli.main import main

COMMANDS = ["run", "batch", "train", "pretrain", "evaluate", "vectorize", "export", "sample"]


def geoseg(*args: str, cwd=None) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "geoseg", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_version_and_help(capsys):  # noqa: ANN001
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):  # noqa: ANN001
    assert main([command, "--help"]) == 0
    assert "Usage: geoseg " + command in capsys.readouterr().out


def test_train_help_lists_the_architectures_and_encoders(capsys):  # noqa: ANN001
    from geoseg.registry import ARCHITECTURES

    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(a in out for a in ARCHITECTURES) and "tu-NAME" in out and "--init" in out


def test_usage_error_exit_code(capsys):  # noqa: ANN001
    assert main(["run"]) == 2
    assert "Missing argument" in capsys.readouterr().err


def test_an_internal_error_has_its_own_exit_code_and_one_line(monkeypatch, capsys):  # noqa: ANN001
    import geoseg.pipeline

    def bug(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(geoseg.pipeline, "load_pipeline", bug)
    assert main(["batch", "any.yaml", "--scenes", "x.tif"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["geoseg: internal error: ZeroDivisionError: a bug (rerun with --verbose for details)"]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_user_errors_are_one_line_without_traceback(tmp_path, sample_scene, fcn_checkpoint):  # noqa: ANN001
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"input": str(sample_scene.image), "model": str(fcn_checkpoint),
                                   "output_dir": "out", "tile": {"sise": 3}}))
    line = one_line_error(geoseg("run", str(cfg)))
    assert "p.yaml: tile.sise: unknown key; did you mean 'size'?" in line
    assert "no such file" not in one_line_error(geoseg("run", str(tmp_path / "missing.yaml")))
    line = one_line_error(geoseg("run", str(cfg), "--set", "tile.sise=1", "--set", "input=nope.tif"))
    assert "input: file not found" in line
    verbose = geoseg("--verbose", "run", str(cfg))
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_sample_and_run_end_to_end(tmp_path, fcn_checkpoint):  # noqa: ANN001
    r = geoseg("sample", str(tmp_path / "s"), "--size", "96", "--width", "120", "--seed", "4")
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"input": "s/scene.tif", "model": str(fcn_checkpoint), "output_dir": "out",
                                   "tile": {"size": 64, "overlap": 16}, "cluster": {"threads_per_worker": 1}}))
    r = geoseg("run", str(cfg), "--set", "write.confidence=uint8", cwd="/")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["status"] == "done" and (tmp_path / "out" / "confidence.tif").exists()
    again = geoseg("run", str(cfg), "--set", "write.confidence=uint8")  # the same run again: nothing to do
    assert again.returncode == 0, again.stderr
    other = geoseg("run", str(cfg), "--set", "tile.overlap=8")  # another run: its outputs would replace these
    assert "exists and won't be overwritten without --overwrite" in one_line_error(other)
    assert geoseg("run", str(cfg), "--overwrite").returncode == 0
    r = geoseg("evaluate", str(tmp_path / "out" / "landcover.tif"), str(tmp_path / "s" / "labels.tif"))
    assert r.returncode == 0 and 0 <= json.loads(r.stdout)["overall_accuracy"] <= 1


@pytest.mark.slow
def test_run_takes_a_raster_with_gdal_style_options(tmp_path, fcn_checkpoint, sample_scene):
    """geoseg run SCENE.tif --model M -o OUT --co KEY=VALUE: the shipped defaults, options anywhere."""
    out = tmp_path / "out"
    r = geoseg("run", str(sample_scene.image), "--model", str(fcn_checkpoint), "-o", str(out), "--co",
               "BLOCKSIZE=256", "--set", "tile.size=64", "--set", "tile.overlap=16", "-q", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["vectorize"]["min_area_px"] == 4
    import rasterio

    with rasterio.open(out / "landcover.tif") as src:
        assert src.block_shapes[0] == (256, 256)
    default = geoseg("run", str(sample_scene.image), "--model", str(fcn_checkpoint), "--set", "tile.size=64",
                     "--set", "tile.overlap=16", cwd=str(tmp_path))
    assert default.returncode == 0 and (tmp_path / "scene-landcover" / "landcover.tif").exists()
    assert "wrote" in default.stderr.splitlines()[-2]


def test_run_says_what_kind_of_file_it_expected(tmp_path, fcn_checkpoint, sample_scene):
    line = one_line_error(geoseg("run", str(sample_scene.image)))
    assert "--model: required with a raster SOURCE (scene.tif)" in line
    line = one_line_error(geoseg("run", str(sample_scene.image), "--config", str(sample_scene.labels),
                                 "--model", str(fcn_checkpoint)))
    assert "--config" in line and "is a raster, not a pipeline YAML" in line
    line = one_line_error(geoseg("run", str(sample_scene.image), "--model", str(sample_scene.labels)))
    assert "labels.tif: is a TIFF raster, not a model checkpoint" in line
    line = one_line_error(geoseg("vectorize", str(sample_scene.labels), str(tmp_path / "missing" / "v.gpkg")))
    assert "folder" in line and "does not exist" in line


@pytest.mark.slow
def test_log_lines_off_a_terminal_carry_time_stamps_and_stage_progress(tmp_path, fcn_checkpoint, sample_scene):
    r = geoseg("run", str(sample_scene.image), "--model", str(fcn_checkpoint), "-o", str(tmp_path / "o"),
               "--set", "tile.size=64", "--set", "tile.overlap=16", "--set", f"evaluate.reference={sample_scene.labels}")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    stamped = [ln for ln in lines if re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ", ln)]
    assert any("segmenting: done" in ln for ln in stamped) and any("vectorizing: done" in ln for ln in stamped)
    assert any("evaluating: done" in ln for ln in stamped)
    assert re.search(r"mIoU 0\.\d{4} over \d classes", lines[-2])


def test_progress_eta_counts_resumed_work_as_done_but_not_in_the_rate():
    from geoseg.progress import Stage

    stage = Stage("segmenting", 100, "tiles", done=60)
    assert stage.eta() is None  # nothing inferred in this run yet: no rate
    stage._start -= 10
    stage.advance(20)
    assert stage.eta() == pytest.approx(10.0, rel=0.05)  # 20 tiles in 10 s, 20 left
    assert "80/100 tiles (80%)" in stage.line()


def test_the_dashboard_without_bokeh_names_the_extra(monkeypatch):
    from geoseg.cluster import open_client
    from geoseg.config import ClusterConfig
    from geoseg.errors import ClusterError

    monkeypatch.setitem(sys.modules, "bokeh", None)
    with pytest.raises(ClusterError, match=r"needs bokeh>=3.1: pip install 'geoseg\[dashboard\]'"):
        with open_client(ClusterConfig(dashboard=True)):
            pass


def test_the_dashboard_serves_its_pages_when_asked_for():
    """cluster.dashboard: true gives a link whose status page is the real dashboard (bokeh, test extra)."""
    from urllib.request import urlopen

    from geoseg.cluster import open_client
    from geoseg.config import ClusterConfig

    with open_client(ClusterConfig(dashboard=True, n_workers=1, threads_per_worker=1)) as client:
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        page = urlopen(link, timeout=30).read().decode()
    assert "bokeh" in page.lower() and "needs bokeh" not in page.lower()

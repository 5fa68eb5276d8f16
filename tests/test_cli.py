"""The CLI: thin commands, one-line errors with non-zero exit codes, tracebacks only with --verbose."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from geoseg import __version__
from geoseg.cli.main import main

COMMANDS = ["run", "batch", "train", "evaluate", "vectorize", "export", "sample"]


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


def test_usage_error_exit_code(capsys):  # noqa: ANN001
    assert main(["run"]) == 2
    assert "Missing argument" in capsys.readouterr().err


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

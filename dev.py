#!/usr/bin/env python3
"""Two commands, nothing installed beforehand but Python 3.10+.

    python3 dev.py demo          # segment the sample scene with the demo model (made on first use)
    python3 dev.py test          # lint (ruff), type-check (mypy), then the fast tier of the tests
    python3 dev.py test --all    # ... then every tier: slow, SLURM, GDAL/QGIS, real data (what CI runs)
    python3 dev.py test ARGS     # pytest ARGS on the fast tier (add --all for every tier); no lint
    python3 dev.py bare          # CI: install geoseg without extras in a fresh venv and run the shipped pipeline

Each makes ``.venv`` on first use (and again when pyproject.toml changes), then runs the job. Standard
library only: this file runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".geoseg-installed"
# glibc otherwise hands the forward pass's buffers back to the OS after every batch (30-45% slower on CPU);
# one arena keeps large blocks on the main heap for threads too (see geoseg/cluster.py).
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
       "MALLOC_ARENA_MAX": "1"}


def say(msg: str) -> None:
    """A progress line of this script."""
    print(f"[dev] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str | Path) -> None:
    """Run a command in the project folder; stop with its exit code when it fails."""
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=ENV)
    if result.returncode:
        sys.exit(result.returncode)


def ensure_env() -> None:
    """Create or refresh .venv when pyproject.toml changed since the last install."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text().strip() == want:
        return
    t0 = time.time()
    if not PY.exists():
        say("creating .venv")
        run(sys.executable, "-m", "venv", VENV)
    say("installing geoseg and its dependencies into .venv (first time: a few minutes, torch is large)")
    run(PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", ".[test,bench]")
    STAMP.write_text(want)
    say(f"environment ready in {time.time() - t0:.0f}s")


def prepare_demo(geoseg: Path) -> None:
    """The sample scenes and the demo model, made when missing."""
    if not (ROOT / "data/sample/scene.tif").exists():
        run(geoseg, "sample", "data/sample", "--size", "1024", "--seed", "0")
    if not (ROOT / "data/sample-val/scene.tif").exists():
        run(geoseg, "sample", "data/sample-val", "--size", "512", "--seed", "1")
    if not (ROOT / "data/sample-test/scene.tif").exists():
        run(geoseg, "sample", "data/sample-test", "--size", "1024", "--seed", "2")
    if not (ROOT / "models/demo.safetensors").exists():
        say("training the demo model (about 2 minutes on 2 cores)")
        run(geoseg, "train", "configs/train-demo.yaml")


def demo(extra: list[str]) -> None:
    """Segment the held-out sample scene with the shipped pipeline."""
    geoseg = BIN / "geoseg"
    prepare_demo(geoseg)
    run(geoseg, "run", "pipelines/landcover.yaml", "--overwrite", *extra)


#: The tests outside the fast tier (markers in pyproject.toml; docs/testing.md).
FAST = "not (slow or slurm or gis or real_data)"


def test(extra: list[str]) -> None:
    """Lint and type checks, then the fast tier of the tests (every tier with ``--all``)."""
    every = "--all" in extra
    extra = [a for a in extra if a != "--all"]
    t0 = time.time()
    if not extra:
        say("ruff check")
        run(BIN / "ruff", "check", "geoseg", "tests", "benchmarks", "dev.py")
        say("mypy geoseg")
        run(BIN / "mypy")
    # The fast tier on two processes: its tests wait on subprocesses and Dask as much as they compute.
    say("fast tier (2 processes)")
    run(PY, "-m", "pytest", "-m", FAST, "-n", "2", *(extra or ["-q"]))
    if every:
        # One process: the SLURM and GIS fixtures install and start real services once per session.
        say(f"the other tiers ({time.time() - t0:.0f}s so far)")
        run(PY, "-m", "pytest", "-m", f"not ({FAST})", *(extra or ["-q"]))
    say(f"tests passed in {time.time() - t0:.0f}s")


def bare(extra: list[str]) -> None:
    """`pip install .` without extras into a fresh venv, then the shipped pipeline with it.

    Proves the declared dependencies are enough for `geoseg run` (the demo model is made with .venv).
    """
    import shutil
    import tempfile

    prepare_demo(BIN / "geoseg")
    venv = Path(tempfile.mkdtemp(prefix="geoseg-bare-")) / "venv"
    try:
        say(f"installing geoseg without extras into {venv}")
        run(sys.executable, "-m", "venv", venv)
        vbin = venv / ("Scripts" if os.name == "nt" else "bin")
        run(vbin / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT))
        out = venv.parent / "out"
        run(vbin / "geoseg", "run", "pipelines/landcover.yaml", "--set", f"output_dir={out}", *extra)
        say(f"bare install ran the shipped pipeline: {sorted(p.name for p in out.iterdir())}")
    finally:
        shutil.rmtree(venv.parent, ignore_errors=True)


def main() -> None:
    """Run the job named on the command line."""
    jobs = {"demo": demo, "test": test, "bare": bare}
    if len(sys.argv) < 2 or sys.argv[1] not in jobs:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    ensure_env()
    jobs[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

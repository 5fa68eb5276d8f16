#!/usr/bin/env python3
"""Two commands, nothing installed beforehand but Python 3.10+:

    python3 dev.py demo    # segment the sample scene with the demo model (made on first use)
    python3 dev.py test    # run the test suite

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
    print(f"[dev] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str | Path) -> None:
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


def demo(extra: list[str]) -> None:
    geoseg = BIN / "geoseg"
    if not (ROOT / "data/sample/scene.tif").exists():
        run(geoseg, "sample", "data/sample", "--size", "1024", "--seed", "0")
    if not (ROOT / "data/sample-val/scene.tif").exists():
        run(geoseg, "sample", "data/sample-val", "--size", "512", "--seed", "1")
    if not (ROOT / "data/sample-test/scene.tif").exists():
        run(geoseg, "sample", "data/sample-test", "--size", "1024", "--seed", "2")
    if not (ROOT / "models/demo.safetensors").exists():
        say("training the demo model (about 2 minutes on 2 cores)")
        run(geoseg, "train", "configs/train-demo.yaml")
    run(geoseg, "run", "pipelines/landcover.yaml", "--overwrite", *extra)


def test(extra: list[str]) -> None:
    run(PY, "-m", "pytest", *(extra or ["-q"]))


def main() -> None:
    jobs = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in jobs:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    ensure_env()
    jobs[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

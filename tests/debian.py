"""Debian packages the tests use as real clients and services (SLURM, GDAL's tools, QGIS), installed on demand.

Installed with apt-get when missing and the tests run as root on a Debian/Ubuntu machine (CI); elsewhere
the tests that need them skip, saying why. ``GEOSEG_NO_APT=1`` never installs anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

_lock = threading.Lock()


class Unavailable(Exception):
    """The packages are missing and cannot be installed here (the message says why)."""


def ensure(packages: list[str], binaries: list[str], log: Path, *, check: list[str] | None = None) -> None:
    """Make ``binaries`` (and the ``check`` command, when given) work, installing ``packages`` if needed."""

    def present() -> bool:
        if not all(shutil.which(b) for b in binaries):
            return False
        return check is None or subprocess.run(check, capture_output=True, timeout=120).returncode == 0

    with _lock:
        if present():
            return
        if os.environ.get("GEOSEG_NO_APT") == "1":
            raise Unavailable(f"{' '.join(packages)} not installed (GEOSEG_NO_APT=1)")
        if os.geteuid() != 0:
            raise Unavailable(f"{' '.join(packages)} not installed, and installing them needs root")
        if shutil.which("apt-get") is None:
            raise Unavailable(f"{' '.join(packages)} not installed, and there is no apt-get to install them")
        # Keep the packages' init scripts from starting daemons with their stock configuration.
        policy = Path("/usr/sbin/policy-rc.d")
        added = not policy.exists()
        if added:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "--no-install-recommends", *packages]
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log, "ab") as out:
                if subprocess.run(cmd, stdout=out, stderr=out, env=env, timeout=1800).returncode:
                    subprocess.run(["apt-get", "update", "-q"], stdout=out, stderr=out, env=env, timeout=900)
                    if subprocess.run(cmd, stdout=out, stderr=out, env=env, timeout=1800).returncode:
                        raise Unavailable(f"apt-get install {' '.join(packages)} failed (see {log})")
        finally:
            if added:
                policy.unlink(missing_ok=True)
        if not present():
            raise Unavailable(f"{' '.join(packages)} installed, but {' / '.join(binaries)} still do not work")

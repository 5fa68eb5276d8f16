"""The test tiers themselves: every marker declared, and the fast tier free of outside systems."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TIERS

ROOT = Path(__file__).resolve().parents[1]
#: pytest's own markers, and the plugins' the project installs.
BUILTIN = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings", "timeout"}


def declared() -> set[str]:
    """The markers pyproject.toml declares (its ``markers = [...]`` list; tomllib is 3.11+)."""
    block = re.search(r"^markers = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    assert block, "pyproject.toml declares no pytest markers"
    return set(re.findall(r'^\s*"(\w+):', block.group(1), re.M))


def test_every_marker_in_use_is_declared_and_every_tier_is_used():
    used = {m for f in (ROOT / "tests").glob("*.py") for m in re.findall(r"pytest\.mark\.(\w+)", f.read_text())}
    assert used - BUILTIN <= declared(), f"undeclared markers: {sorted(used - BUILTIN - declared())}"
    assert set(TIERS) <= declared() and set(TIERS) <= used, "a tier marker is declared but marks no test"


def needs(entry: dict) -> list[str]:
    """The outside systems a collected test reaches for, from its fixtures and its own source."""
    found = []
    if "slurm" in entry["fixtures"]:
        found.append("slurm")
    if re.search(r"\b(gdal_tool|ensure)\(", entry["source"]):  # tests/debian.py's Debian packages
        found.append("gis")
    if "SHARED_DATA" in entry["source"]:
        found.append("real_data")
    return found


def every_test(request, tmp_path) -> list[dict]:  # noqa: ANN001
    """What tests/conftest.py recorded of every test: from this session when it collected them all, else anew."""
    collected = getattr(request.config, "geoseg_collected", [])
    files = {f"tests/{f.name}" for f in (ROOT / "tests").glob("test_*.py")}
    if {e["nodeid"].split("::")[0] for e in collected} != files:
        dump = tmp_path / "collected.json"
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "tests"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "GEOSEG_DUMP_COLLECTED": str(dump)})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        collected = json.loads(dump.read_text())
    assert {e["nodeid"].split("::")[0] for e in collected} == files
    return collected


def test_no_fast_test_needs_slurm_gis_tools_or_shared_data(request, tmp_path):  # noqa: ANN001
    collected = every_test(request, tmp_path)
    wrong = [f"{e['nodeid']} needs {need} but is not marked so" for e in collected for need in needs(e)
             if need not in e["markers"]]
    assert not wrong, "\n".join(wrong)


def test_the_fast_tier_guard_refuses_ports_the_test_did_not_open(monkeypatch):  # noqa: ANN001
    import errno

    from tests.conftest import PortGuard

    with socket.create_server(("127.0.0.1", 0)) as before, socket.create_server(("127.0.0.1", 0)) as own:
        port = before.getsockname()[1]
        guard = PortGuard({port})  # "before": listening when the session began
        guard.install(monkeypatch)
        socket.create_connection(own.getsockname(), timeout=5).close()  # the test's own port: fine
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(before.getsockname(), timeout=5)
        probe = socket.socket()
        try:
            assert probe.connect_ex(before.getsockname()) == errno.ECONNREFUSED
        finally:
            probe.close()
        assert not guard.allowed(socket.AF_INET, ("192.0.2.7", 443))  # another machine
        assert guard.allowed(socket.AF_UNIX, "/tmp/some.sock")
    assert guard.refused == [f"127.0.0.1:{port}"] * 2 + ["192.0.2.7:443"]

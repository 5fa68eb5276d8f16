"""A private single-node SLURM for the tests: munged, slurmctld and slurmd from Debian's packages.

Modelled on the team's ``start_slurm.sh``: installed with apt-get when missing (as root), configured and
run entirely below one folder (config, munge key and socket, state, spool, logs, PID files) on free ports,
so it neither needs nor disturbs a SLURM already on the machine. The client commands find it through
``SLURM_CONF``. Jobs run as root with the submitter's environment, on this machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.debian import Unavailable, ensure

__all__ = ["PrivateSlurm", "Unavailable"]

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid_file: Path, name: str) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    # A killed daemon stays a zombie until reaped; where PID 1 does not reap, that is forever.
    return f"({name})" in stat and stat.split(") ", 1)[1][:1] != "Z"


def install(log: Path) -> None:
    """Debian's SLURM and munge packages, when missing (:func:`tests.debian.ensure`)."""
    ensure(PACKAGES, BINARIES, log)


class PrivateSlurm:
    """One node, one partition (``debug``), everything below ``root``; ``start()`` then ``stop()``."""

    partition = "debug"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.etc, self.run, self.logs = self.root / "etc", self.root / "run", self.root / "log"
        self.munge = self.root / "munge"
        self.conf = self.etc / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.cpus = 0
        self.memory_mb = 0
        self.started_s = 0.0

    @property
    def env(self) -> dict[str, str]:
        """What the client commands need to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done

    def start(self) -> None:
        """Install when missing, configure and start the daemons; return once the node takes jobs."""
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise Unavailable("a private SLURM needs root (slurmd starts jobs as their users)")
        for d in (self.etc, self.run, self.logs, self.munge, self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        install(self.root / "apt.log")
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(kv.split("=", 1) for kv in hw.split() if "=" in kv)
        self.cpus = int(fields.get("CPUs", os.cpu_count() or 1))
        self.memory_mb = int(int(fields.get("RealMemory", 4096)) * 0.85)
        self.conf.write_text(self._config(_free_port(), _free_port()))
        key = self.munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge.chmod(0o755)
        socket_path = self.munge / "munge.socket"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={self.run / 'munged.pid'}", f"--log-file={self.logs / 'munged.log'}",
                        f"--seed-file={self.munge / 'munged.seed'}", "--num-threads=2"], check=True, timeout=30)
        self._until(lambda: socket_path.exists() and _alive(self.run / "munged.pid", "munged"), 10, "munged")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, timeout=30, env={**os.environ, **self.env})
        self._until(lambda: "UP" in self.command("scontrol", "ping", check=False).stdout, 20, "slurmctld")
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, timeout=30, env={**os.environ, **self.env})
        self._until(self._node_ready, 60, "slurmd (node not idle)")
        self.started_s = time.monotonic() - t0

    def _node_ready(self) -> bool:
        state = self.command("sinfo", "-h", "-n", self.host, "-o", "%T", check=False).stdout.strip()
        if state.startswith(("down", "drain")):
            self.command("scontrol", "update", f"NodeName={self.host}", "State=RESUME", check=False)
        return state in ("idle", "mixed", "allocated", "completing")

    def _until(self, ready, timeout_s: float, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        tail = ""
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.logs / name
            if path.exists():
                tail += f"\n--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        self.stop()
        raise Unavailable(f"{what} did not come up within {timeout_s:g}s{tail}")

    def _config(self, ctld_port: int, d_port: int) -> str:
        r = self.root
        return f"""# A private single-node cluster for geoseg's tests (tests/private_slurm.py).
ClusterName=geosegtest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge / 'munge.socket'}
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={self.run / 'slurmctld.pid'}
SlurmdPidFile={self.run / 'slurmd.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=10
OverTimeLimit=0
Waittime=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def jobs(self) -> list[dict[str, str]]:
        """The jobs in the queue: id, name, state, reason."""
        out = self.command("squeue", "-h", "-o", "%i|%j|%T|%r", check=False).stdout
        return [dict(zip(("id", "name", "state", "reason"), ln.split("|"))) for ln in out.splitlines() if ln]

    def cancel_all(self) -> None:
        """scancel every job, and wait (30 s at most) until the queue is empty."""
        ids = [j["id"] for j in self.jobs()]
        if ids:
            self.command("scancel", *ids, check=False)
        deadline = time.monotonic() + 30
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, stop exactly the daemons this started (their PID files), remove the folder."""
        if _alive(self.run / "slurmctld.pid", "slurmctld"):
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.run / f"{name}.pid"
            if not _alive(pid_file, name):
                continue
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid_file, name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid_file, name):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

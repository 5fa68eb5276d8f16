"""A run is a transaction: one run per folder, outputs staged, then published all at once.

- :class:`FolderLock`: ``OUT/.geoseg.lock`` is created exclusively (``O_CREAT | O_EXCL``, atomic on local
  and NFS filesystems) and holds the holder's host, PID, process start time and start date. A second run
  fails at once naming the holder. A lock whose process is gone (same host: the PID is dead or is another
  process now; another host: no heartbeat for :data:`STALE_AFTER_S`) is taken over with a message.
- :class:`Stage`: every output is written into ``OUT/.geoseg-stage/`` under its final name. Publishing
  writes the commit journal ``OUT/.geoseg-commit.json`` (the point of no return), renames the outputs
  into place, the manifest last, then removes the journal and the stage. A kill between two renames leaves
  the journal, and the next run completes the commit before anything else. A run that fails or is
  interrupted before the journal exists leaves the folder's previous outputs as they were.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from geoseg import _faults
from geoseg._io import remove
from geoseg.errors import GeosegError

log = logging.getLogger("geoseg")

LOCK = ".geoseg.lock"
STAGE = ".geoseg-stage"
JOURNAL = ".geoseg-commit.json"
#: Seconds between the lock holder's heartbeats (the lock file's modification time).
HEARTBEAT_S = 10.0
#: A lock of another host without a heartbeat for this long belongs to a run that is gone.
STALE_AFTER_S = 120.0


class FolderLockedError(GeosegError, BlockingIOError):
    """Another run holds the output folder."""


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    if start is not None and _process_start(pid) not in (None, start):
        return False  # the PID was reused by another process
    status = Path(f"/proc/{pid}/status")
    try:  # a killed, unreaped process is not running
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return True


class FolderLock:
    """An exclusive, heartbeat-refreshed lock on a folder: ``with FolderLock(out): ...``."""

    def __init__(self, folder: Path, what: str = "run", name: str = LOCK) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (host, pid, started, what), or None when nobody alive does."""
        if not self.path.exists():
            return None
        holder = self._holder()
        return None if self._stale(holder) else holder

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:  # empty or torn: a holder killed while writing it, or one writing it right now
            try:
                return time.time() - self.path.stat().st_mtime > 5
            except FileNotFoundError:
                return True
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", -1)), holder.get("start"))
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FolderLockedError` naming the holder."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": self.token,
              "what": self.what}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                           f"{holder.get('started', '?')}") if holder else "a run that is starting"
                    raise FolderLockedError(
                        f"{self.folder}: another geoseg {holder.get('what', 'run')} is using this folder ({who}); "
                        f"wait for it to finish or stop it (a lock left by a dead run is taken over "
                        f"automatically; {self.path.name} holds the details)") from None
                # Renaming the stale lock away is atomic: of two runs taking it over, one wins the rename.
                try:
                    os.rename(self.path, self.path.with_name(f"{self.path.name}.stale-{self.token}"))
                except FileNotFoundError:
                    continue
                remove(self.path.with_name(f"{self.path.name}.stale-{self.token}"))
                if holder:
                    log.warning("%s: took over the lock of a run that is gone (host %s, pid %s, started %s)",
                                self.folder, holder.get("host"), holder.get("pid"), holder.get("started"))
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._beat = threading.Thread(target=self._heartbeat, name="geoseg-lock", daemon=True)
            self._beat.start()
            return
        raise FolderLockedError(f"{self.folder}: could not take the folder's lock ({self.path.name}); retry")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Give the lock back (only ours: a lock taken over by another run stays theirs)."""
        self._stop.set()
        if self._holder().get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@contextmanager
def _interrupts_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while the block runs (in the main thread): a commit is never cut in half.

    Yields the list of signals that arrived meanwhile.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    got: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


class Stage:
    """The staging area of a run's outputs inside ``folder``, and their commit."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STAGE
        self.journal = self.folder / JOURNAL

    def recover(self) -> bool:
        """Complete a commit a killed run left half done (the journal exists); drop a stale stage.

        Returns whether a commit was completed.
        """
        completed = False
        if self.journal.exists():
            try:
                names = json.loads(self.journal.read_text())["names"]
            except (OSError, ValueError, KeyError, TypeError):
                names = None
            if names is None:  # a torn journal: the commit never started (it is written atomically)
                self.journal.unlink(missing_ok=True)
            else:
                self._publish(names)
                completed = True
                log.warning("%s: completed the commit of a run that was stopped while publishing its outputs",
                            self.folder)
        remove(self.path)
        return completed

    def create(self) -> Path:
        """A fresh, empty staging folder."""
        remove(self.path)
        self.path.mkdir(parents=True)
        return self.path

    def commit(self, names: list[str]) -> None:
        """Publish the staged ``names`` (in order: put the manifest last) into the folder, all or none."""
        present = [n for n in names if (self.path / n).exists()]
        for name in present:
            _fsync(self.path / name)
        with _interrupts_deferred() as interrupts:
            tmp = self.journal.with_name(self.journal.name + ".tmp")
            tmp.write_text(json.dumps({"names": present}) + "\n")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.journal)  # the point of no return
            _faults.point("journal")
            self._publish(present)
            remove(self.path)
        if interrupts:
            log.warning("interrupt received while publishing the outputs; the run had finished: they are complete")

    def _publish(self, names: list[str]) -> None:
        for k, name in enumerate(names):
            src, dst = self.path / name, self.folder / name
            if not src.exists():
                continue  # published before a kill
            if dst.is_dir() and not dst.is_symlink():
                remove(dst)  # a folder output (Zarr) cannot be replaced by one rename
            os.replace(src, dst)
            if k == 0:
                _faults.point("commit")
        self.journal.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop everything staged."""
        remove(self.path)

"""Fault points for the crash tests: ``GEOSEG_KILL_AT=NAME`` makes a run SIGKILL itself at point NAME.

A run is a transaction (:mod:`geoseg.transaction`); the tests prove it by killing runs at named moments
(set-up, inference, writing, vectorizing, publishing) and checking that the rerun finishes with
byte-identical outputs. Unset, a point costs one dictionary lookup.

Where a run's outputs are written on a worker (``write.on_workers``), the client arms the worker's task
with :func:`armed` and :func:`arm`: the point then kills the client, which is the process the test kills,
at the moment the worker reaches it, and stops the task there.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_REMOTE = threading.local()


class Killed(RuntimeError):
    """A worker task stopped at the fault point whose client it killed."""


def point(name: str) -> None:
    """Die here (SIGKILL, no clean-up of any kind) when ``GEOSEG_KILL_AT`` names this point."""
    remote = getattr(_REMOTE, "armed", None)
    if remote is not None:
        if remote[0] == name:
            os.kill(remote[1], signal.SIGKILL)
            raise Killed(f"fault point {name}: killed the client (pid {remote[1]})")
        return
    if os.environ.get("GEOSEG_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def armed() -> tuple[str, int] | None:
    """This process's fault point and pid, for a task it hands to a worker (None when none is set)."""
    name = os.environ.get("GEOSEG_KILL_AT")
    return (name, os.getpid()) if name else None


@contextmanager
def arm(remote: tuple[str, int] | None) -> Iterator[None]:
    """Within the block, this thread's points kill the process ``remote`` names (from :func:`armed`)."""
    if remote is None:
        yield
        return
    _REMOTE.armed = remote
    try:
        yield
    finally:
        _REMOTE.armed = None

"""Fault points for the crash tests: ``GEOSEG_KILL_AT=NAME`` makes a run SIGKILL itself at point NAME.

A run is a transaction (:mod:`geoseg.transaction`); the tests prove it by killing runs at named moments
(set-up, inference, writing, vectorizing, publishing) and checking that the rerun finishes with
byte-identical outputs. Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    """Die here (SIGKILL, no clean-up of any kind) when ``GEOSEG_KILL_AT`` names this point."""
    if os.environ.get("GEOSEG_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

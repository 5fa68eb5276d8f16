"""Ctrl-C and SIGTERM: a stop request that is never lost.

Python raises ``KeyboardInterrupt`` in the main thread wherever it happens to be; raised inside a
finalizer or a library callback it is printed and swallowed, and the run went on to finish (seen in about
one run in three when interrupted during inference). The handler therefore also records the request, and
the stages :func:`check` it between chunks, so the run stops at the next one at the latest.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_requested = threading.Event()


def requested() -> bool:
    """Whether a stop was asked for (SIGINT or SIGTERM) since the handlers were installed."""
    return _requested.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` when a stop was asked for."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _handler(signum: int, frame: Any) -> None:
    _requested.set()
    raise KeyboardInterrupt


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM (a scheduler's time limit, systemd, kill) stop the run like Ctrl-C while the block runs.

    The previous handlers come back afterwards. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous: dict[signal.Signals, Callable[..., Any] | int | None] = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.getsignal(s)
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

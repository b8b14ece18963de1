"""Termination signals as exceptions, so that a stopped run says so and frees its folder.

Without this, SIGTERM (`kill`, a scheduler's preemption, `docker stop`) or SIGHUP (a closed
terminal) ends the process at once: run.json keeps saying "running", and nothing on disk tells a
stopped run from one still going. Raised as an exception instead, the stop goes through the
run's own error path, which records it and releases the folder's lock. A second signal of the
same kind ends the process at once, as before."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal (like Ctrl-C, not an error of the run)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (128 + its number)."""
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one is not caught: it ends the process
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Stopped` in the main thread. A signal the
    process ignores (SIGHUP under `nohup`) stays ignored; outside the main thread, where Python
    cannot set handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in SIGNALS:
        if signal.getsignal(s) != signal.SIG_IGN:
            previous[s] = signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""Fault injection for testing recovery: kill this process at a chosen round, once.

`DECLORA_KILL_AT=ROUND` (simulation) or `DECLORA_KILL_AT=PEER:ROUND` (distributed: only the
process holding that peer) sends SIGKILL to the process right after that round's local steps,
before it communicates or checkpoints: a real crash, not an exception. Under torchrun it fires
only in the first attempt (`TORCHELASTIC_RESTART_COUNT` 0), so a restarted group runs through.
`DECLORA_KILL_SIGNAL=TERM` (or HUP, INT) sends that signal instead: a stop the run can record.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from declora.errors import ConfigError

KILL_ENV = "DECLORA_KILL_AT"
SIGNAL_ENV = "DECLORA_KILL_SIGNAL"
SIGNALS = ("KILL", "TERM", "HUP", "INT")


def kill_point() -> tuple[int | None, int] | None:
    """(peer or None, round) from the environment, or None when unset."""
    raw = os.environ.get(KILL_ENV, "").strip()
    if not raw:
        return None
    peer, _, round_ = raw.rpartition(":")
    try:
        return (int(peer) if peer else None), int(round_)
    except ValueError:
        raise ConfigError(
            f"{KILL_ENV}={raw!r} is not understood; use ROUND or PEER:ROUND (integers)"
        ) from None


def kill_signal() -> signal.Signals:
    """The signal `maybe_kill` sends: SIGKILL unless the environment names another."""
    raw = os.environ.get(SIGNAL_ENV, "KILL").strip().upper().removeprefix("SIG")
    if raw not in SIGNALS:
        raise ConfigError(f"{SIGNAL_ENV}={raw!r} is not one of {', '.join(SIGNALS)}")
    return signal.Signals[f"SIG{raw}"]


def maybe_kill(round_: int, peers: Sequence[int]) -> None:
    point = kill_point()
    if point is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    peer, at = point
    if round_ == at and (peer is None or peer in peers):
        os.kill(os.getpid(), kill_signal())

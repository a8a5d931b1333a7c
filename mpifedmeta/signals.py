"""Stop requests: SIGTERM, SIGINT and SIGUSR1 set a flag; the training loop finishes the current
round, every rank agrees through the round's Allreduce, writes a checkpoint and exits with code 3.

Kept free of heavy imports so that the CLI can install the handlers before torch and MPI load
(a USR1 arriving during start-up would otherwise kill the rank). Install again right after MPI
init: the mpich wheel installs its own USR1 handler inside MPI_Init.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
_requested: dict = {"signal": None}


def _on_signal(signum, frame) -> None:
    _requested["signal"] = signal.Signals(signum).name


def install() -> None:
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)


def requested() -> str | None:
    """The name of the first stop signal received, or None."""
    return _requested["signal"]

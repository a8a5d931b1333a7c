"""Stop requests: SIGTERM, SIGINT and SIGUSR1 set a flag; the training loop finishes the current
round, every rank agrees through the round's Allreduce, writes a checkpoint and exits with code 3.

Kept free of heavy imports so that the CLI can install the handlers before torch and MPI load
(a USR1 arriving during start-up would otherwise kill the rank). Install again right after MPI
init: the mpich wheel installs its own USR1 handler inside MPI_Init.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
_requested: dict = {"signal": None, "hook": None}


def _on_signal(signum, frame) -> None:
    if _requested["signal"] is None:
        _requested["signal"] = signal.Signals(signum).name
    hook = _requested["hook"]
    if hook is not None:          # later signals change nothing but may retry the hook
        hook()


def on_stop(hook) -> None:
    """Call ``hook()`` from the handler of every stop signal (None: no hook). Used by rank 0 to write
    the last completed round's checkpoint at once."""
    _requested["hook"] = hook
    if hook is not None and _requested["signal"] is not None:
        hook()


def ignore() -> None:
    """Ignore the stop signals from now on (at exit, the outcome decided). Python's finalization puts
    back the default action of signals that have a Python handler, not of ignored ones; blocking
    would not do, since other threads (OpenMP, MPI) would still take the signal."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def install() -> None:
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)


def requested() -> str | None:
    """The name of the first stop signal received, or None."""
    return _requested["signal"]

"""How every rank agrees: on errors (:func:`agreed`: the first error of any rank becomes the same
exception on every rank, so that no rank is left waiting in a collective) and on the output
directory (checked before any set-up, locked by rank 0 for the run's life)."""

from __future__ import annotations

import contextlib
import os
import sys

from mpifedmeta.data import DataError
from mpifedmeta.parallel import dist
from mpifedmeta.run.config import ConfigError
from mpifedmeta.storage import files, hdf5, lock


class BadInput(RuntimeError):
    """Bad configuration, files or flags: one line, exit code 2 on every rank."""


INPUT_ERRORS = (ConfigError, DataError, dist.LaunchError, hdf5.OutputError, lock.LockError, ValueError, OSError)
_DISK_FULL = "\x00disk-full\x00"


def agreed(world: dist.World, action, root_only: bool = False, errors: tuple = INPUT_ERRORS):
    """Run ``action()`` on every rank (rank 0 only when ``root_only``) and let every rank learn the
    first error of any rank: ``errors`` become BadInput (exit 2), files.DiskFull stays DiskFull (exit 5),
    on every rank, so that no rank is left waiting in a collective. Returns action's value (None on
    the ranks that did not run it)."""
    value, err = None, None
    if world.is_root or not root_only:
        try:
            value = action()
        except files.DiskFull as e:
            err = _DISK_FULL + str(e)
        except errors as e:
            err = str(e).splitlines()[0] if str(e) else type(e).__name__
    err = dist.first_error(world, err)
    if err and _DISK_FULL in err:
        raise files.DiskFull(28, err.replace(_DISK_FULL, ""))
    if err:
        raise BadInput(err)
    return value


def check_output_dir(out_dir: str) -> None:
    """ConfigError unless ``out_dir`` is a directory we can write or can create (checked before any set-up)."""
    if not out_dir or not out_dir.strip():
        raise ConfigError("output.dir is empty; give the directory for the results")
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe) and probe != os.path.dirname(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "exists and is not a directory" if probe == os.path.abspath(out_dir) else f"{probe} is not a directory"
        raise ConfigError(f"output.dir = {out_dir!r}: {where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir = {out_dir!r}: {probe} is not writable")


@contextlib.contextmanager
def output_lock(world: dist.World, out_dir: str):
    """Hold OUT/.lock on rank 0 for the block (every rank agrees whether it was taken: exit 2 if not)."""
    held = lock.OutputLock(out_dir) if world.is_root else None
    agreed(world, held.acquire if held else None, root_only=True)
    try:
        if held is not None and held.warning:
            print(held.warning, file=sys.stderr, flush=True)
        yield
    finally:
        if held is not None:
            held.release()

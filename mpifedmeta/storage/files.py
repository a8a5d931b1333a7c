"""Replacing output files atomically, and what goes with it: fsync, disk-full errors, stale temporaries.

No HDF5 here (:mod:`mpifedmeta.storage.io` writes its HDF5 files through :func:`replace_atomically`). A file
is written to ``.NAME.tmp-PID`` in the same directory, fsync'ed and renamed over NAME, so a crash or
kill mid-write leaves the previous file intact.
"""

from __future__ import annotations

import errno
import os
import re
from typing import BinaryIO, Callable

_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


class DiskFull(OSError):
    """No space left (or quota exceeded) while writing an output file; the message is one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def _is_no_space(e: BaseException) -> bool:
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)     # h5py does not always carry errno; its message does
    return "No space left on device" in text or "errno = 28," in text or "Disk quota exceeded" in text


def device_of(path: str) -> str:
    """'DEVICE (mounted on MOUNT)' of the file system holding ``path`` (from /proc/self/mounts)."""
    real = os.path.realpath(path)
    best = ("?", "/")
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 2:
                    continue
                source, mount = parts[0], parts[1].replace("\\040", " ")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                    best = (source, mount)
    except OSError:
        pass
    return f"{best[0]} (mounted on {best[1]})"


def _maybe_inject_no_space(path: str) -> None:
    """Fault injection for tests: MPIFEDMETA_INJECT_ENOSPC=TEXT fails writes of files whose path contains TEXT."""
    spec = os.environ.get("MPIFEDMETA_INJECT_ENOSPC")
    if spec and spec in path:
        raise OSError(errno.ENOSPC, "No space left on device (MPIFEDMETA_INJECT_ENOSPC)")


def clean_stale_temps(out_dir: str) -> list[str]:
    """Remove the temporary files ('.NAME.tmp-PID') of writers that are no longer running on this host."""
    removed = []
    for d in (out_dir, os.path.join(out_dir, "checkpoints")):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            m = _TMP_RE.match(name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                try:
                    os.remove(os.path.join(d, name))
                    removed.append(os.path.join(d, name))
                except OSError:
                    pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: str, produce: Callable[[str], None]) -> None:
    """``produce`` writes a temporary file next to ``path``; fsync it, rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        produce(tmp)
        _maybe_inject_no_space(path)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except Exception as e:
        if _is_no_space(e):
            raise DiskFull(errno.ENOSPC, f"no space left on {device_of(directory)} while writing {path}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write any file atomically (report images, summary.md): ``write`` gets a binary file object."""

    def produce(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    replace_atomically(path, produce)

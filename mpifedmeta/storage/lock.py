"""The output directory's lock: at most one run or resume writes an output directory at a time.

Rank 0 holds ``flock(LOCK_EX)`` on ``OUT/.lock`` for the whole run. The kernel releases a flock
when its holder dies (even by SIGKILL), so on a local disk a lock is never stale. On NFS, Linux
maps flock to NFS byte-range locks (exclusive across client hosts unless the file system is
mounted with ``nolock`` or ``local_lock=flock``); on Lustre only with the ``flock`` mount option.
Where the file system refuses flock the run goes on with a warning (no protection).
While held, the file names the holder (host, PID, start time); it is emptied when released and
never deleted (deleting a lock file lets two processes lock two different files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockError(RuntimeError):
    """The output directory is in use (one line naming the holder), or the lock cannot be made."""


def holder_text(path: str) -> str:
    """A description of the holder recorded in a lock file ('unknown holder' if unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            text = os.read(fd, 512).decode(errors="replace").strip()
        finally:
            os.close(fd)
    except OSError:
        text = ""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if not {"host", "pid"} <= set(fields):
        return "an unknown holder"
    desc = f"host {fields['host']}, PID {fields['pid']}, started {fields.get('started', '?')}"
    if fields["host"] == socket.gethostname() and fields["pid"].isdigit() and not pid_alive(int(fields["pid"])):
        desc += ("; that process is gone, so a process it started (or, on a network file system, the "
                 "server's lease of a crashed client) still holds the lock")
    return desc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``with OutputLock(out_dir):`` — exclusive use of ``out_dir`` (created if missing)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd: int | None = None
        self.created_dir = False
        self.warning: str | None = None

    def acquire(self) -> None:
        if not os.path.isdir(self.out_dir):
            os.makedirs(self.out_dir, exist_ok=True)
            self.created_dir = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise LockError(f"output.dir = {self.out_dir!r}: cannot create the lock file {self.path}: "
                            f"{e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LockError(f"output.dir = {self.out_dir!r}: {self.path} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise LockError(f"output.dir = {self.out_dir!r} is in use by another mpifedmeta run or resume "
                                f"({holder_text(self.path)}); wait for it to end or choose another output.dir") from None
            if e.errno not in _UNSUPPORTED:
                os.close(fd)
                raise LockError(f"output.dir = {self.out_dir!r}: cannot lock {self.path}: {e.strerror}") from None
            self.warning = (f"mpifedmeta: warning: the file system of {self.out_dir} does not support flock "
                            f"({e.strerror}); nothing prevents a second run from writing the same output.dir")
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()} started={started}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
            if self.created_dir and os.listdir(self.out_dir) == [LOCK_NAME]:
                os.remove(self.path)          # a run that wrote nothing leaves no directory behind
                os.rmdir(self.out_dir)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

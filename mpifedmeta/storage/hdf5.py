"""What the checkpoint and metrics files share: HDF5 opened only after checks, atomic writes, and
one-line errors naming the file. Every write goes to a temporary file in the same directory, is
flushed, fsync'ed and renamed, so a crash or kill mid-write leaves the previous file intact.
Loading never unpickles. Only rank 0 writes. (Layout: docs/hdf5-layout.md.)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from typing import Any, Callable

import h5py
import numpy as np

from mpifedmeta.storage.files import replace_atomically

FORMAT_VERSION = 1


class OutputError(ValueError):
    """A missing, truncated, foreign or mismatching output file (one line naming the path)."""


def atomic_write(path: str, fill: Callable[[h5py.File], None], start_from: str | None = None) -> None:
    """Write HDF5 ``path`` atomically: ``fill`` gets an open file (a copy of ``start_from`` when given)."""

    def produce(tmp: str) -> None:
        if start_from is not None:
            shutil.copyfile(start_from, tmp)
        with h5py.File(tmp, "r+" if start_from is not None else "w") as f:
            fill(f)
            f.flush()

    replace_atomically(path, produce)


def open_checked(path: str, fmt: str) -> h5py.File:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise OutputError(f"{path}: file not found") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(mode):      # a FIFO or device would block or never end
        raise OutputError(f"{path}: not a regular file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise OutputError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    got = f.attrs.get("format")
    if isinstance(got, bytes):
        got = got.decode()
    if got != fmt:
        f.close()
        raise OutputError(f"{path}: not an {fmt.replace('.', ' ')} file (format attribute is {got!r})")
    if int(f.attrs.get("format_version", -1)) > FORMAT_VERSION:
        f.close()
        raise OutputError(f"{path}: format_version {int(f.attrs['format_version'])} is newer than this mpifedmeta supports ({FORMAT_VERSION})")
    return f


def int_attr(f, name: str, path: str) -> int:
    if name not in f.attrs:
        raise OutputError(f"{path}: attribute {name!r} is missing")
    v = f.attrs[name]
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise OutputError(f"{path}: attribute {name!r} must be an integer, got {str(v)[:40]!r}")
    return int(v)


def config_attr(f, path: str) -> str:
    v = f.attrs.get("config")
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if not isinstance(v, str):
        raise OutputError(f"{path}: attribute 'config' is missing or not a string")
    try:
        parsed = json.loads(v)
    except ValueError:
        raise OutputError(f"{path}: attribute 'config' is not valid JSON") from None
    if not isinstance(parsed, dict) or not all(isinstance(x, dict) for x in parsed.values()):
        raise OutputError(f"{path}: attribute 'config' is not a JSON table of sections")
    return v


def attr_str(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return attr_str(value[()])
    return str(value)


def plain_attr(value: Any) -> Any:
    if isinstance(value, (bytes, np.bytes_, str)):
        return attr_str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def h5py_version() -> str:
    return h5py.__version__


def config_json_equal(a: str, b: str, ignore: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Keys whose values differ between two config JSON strings (``ignore``: section → keys)."""
    ja, jb = json.loads(a), json.loads(b)
    diffs = []
    for sec in sorted(set(ja) | set(jb)):
        for k in sorted(set(ja.get(sec, {})) | set(jb.get(sec, {}))):
            if ignore and k in ignore.get(sec, ()):
                continue
            if ja.get(sec, {}).get(k) != jb.get(sec, {}).get(k):
                diffs.append(f"{sec}.{k}")
    return diffs

"""A user's dataset loader named in the configuration: ``data.dataset = "file.py:load"`` (or
``"package.module:load"``, see mpifedmeta/userfile.py).

``load(path: str, dtype: numpy.dtype)`` gets ``data.path`` (may be empty) and the run's floating
precision, and returns either an :class:`mpifedmeta.data.Dataset` or a mapping (a dict, an opened
``numpy.load`` archive) with ``x`` (n, ...) numeric features, ``y`` (n,) integer labels 0..C-1 and
optionally ``agent`` (n,) int (natural partition), ``test`` (n,) bool and ``num_classes``. Both are
checked exactly like an npz file (data/loaders.py) and every problem is one line naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mpifedmeta import userfile
from mpifedmeta.errors import DataError

from .dataset import Dataset, _npz_agents, _npz_features, _npz_labels

KEY = "data.dataset"


def load_user(spec: str, path: str, dtype: np.dtype) -> Dataset:
    try:
        out = userfile.call(spec, KEY, path, np.dtype(dtype))
    except userfile.UserFileError as e:
        raise DataError(str(e)) from None
    where = f"{KEY} = {spec!r}:"
    if isinstance(out, Dataset):
        arrays = {"x": out.x, "y": out.y, "agent": out.agent, "test": out.test, "num_classes": out.num_classes}
        name = out.name
    elif isinstance(out, Mapping) or hasattr(out, "files"):      # numpy.load's NpzFile
        keys = set(out.keys())
        for k in ("x", "y"):
            if k not in keys:
                raise DataError(f"{where} the returned mapping has no key {k!r} (found: {sorted(map(str, keys))})")
        arrays = {k: out[k] if k in keys else None for k in ("x", "y", "agent", "test", "num_classes")}
        name = spec
    else:
        raise DataError(f"{where} the loader returned a {type(out).__name__}; expected an mpifedmeta.data.Dataset "
                        "or a mapping with keys 'x' and 'y'")
    as_array = {k: None if v is None else np.asarray(v) for k, v in arrays.items() if k != "num_classes"}
    x = _npz_features(where, as_array["x"], dtype)
    y = _npz_labels(where, as_array["y"], x.shape[0])
    agent, test = _npz_agents(where, as_array["agent"], as_array["test"], x.shape[0])
    return Dataset(x=x, y=y, num_classes=_num_classes(where, arrays["num_classes"], y), name=name,
                   agent=agent, test=test)


def _num_classes(where: str, given, y: np.ndarray) -> int:
    """The given number of classes (checked against the labels), else the largest label + 1."""
    if given is None:
        return int(y.max()) + 1
    if isinstance(given, np.ndarray) and given.ndim == 0:
        given = given.item()
    if isinstance(given, (bool, np.bool_)) or not isinstance(given, (int, np.integer)) or given < 1:
        raise DataError(f"{where} num_classes = {given!r} must be a positive integer")
    if int(y.max()) >= given:
        raise DataError(f"{where} label {int(y.max())} is out of range for num_classes = {int(given)} "
                        "(labels must be 0..num_classes-1)")
    return int(given)

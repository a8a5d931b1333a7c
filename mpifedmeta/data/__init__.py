"""Datasets and federated partitions (pure numpy)."""

from .loaders import LOADERS, DataError, Dataset, load_dataset
from .partition import SCHEMES, Partition, make_partition

__all__ = [
    "DataError",
    "Dataset",
    "load_dataset",
    "Partition",
    "make_partition",
    "LOADERS",
    "SCHEMES",
]

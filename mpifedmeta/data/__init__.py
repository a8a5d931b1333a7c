"""Datasets and federated partitions (pure numpy)."""

from .loaders import DATASET_NAMES, DataError, Dataset, load_dataset
from .partition import SCHEMES, Partition, make_partition

__all__ = [
    "DataError",
    "Dataset",
    "load_dataset",
    "Partition",
    "make_partition",
    "DATASET_NAMES",
    "SCHEMES",
]

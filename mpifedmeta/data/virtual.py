"""Virtual agents over a real dataset: agent k's sample indices as a pure function of (seed, k).

Unlike the disjoint partitions of partition.py (every sample belongs to exactly one agent, so the
number of agents is bounded by the data), a virtual agent draws its own ``samples`` indices into the
shared dataset from its own counter-based stream:

- ``shards``: ``classes_per_agent`` distinct classes chosen uniformly, the samples split evenly over them;
- ``dirichlet``: class proportions p_k ~ Dirichlet(α·1), class counts ~ Multinomial(samples, p_k);

then, per class, distinct samples of that class chosen uniformly (no duplicates within an agent),
shuffled, and the first round(test_fraction · samples) (≥ 1) set aside as the agent's test split.
Different agents may share samples (one agent's test sample can be another's training sample);
the population can be far larger than the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .loaders import DataError, Dataset
from .synthetic import stream

VIRTUAL_STREAM = 0x717A
SCHEMES = ("shards", "dirichlet")


@dataclass(frozen=True)
class VirtualSpec:
    scheme: str               # "shards" | "dirichlet"
    samples: int              # samples per agent, train + test
    classes_per_agent: int
    dirichlet_alpha: float
    test_fraction: float
    seed: int


def split_counts(spec: VirtualSpec) -> tuple[int, int]:
    """(train, test) samples of every agent: the test split is round(test_fraction · samples), kept in [1, samples − 1]."""
    test = min(max(int(np.floor(spec.test_fraction * spec.samples + 0.5)), 1), spec.samples - 1)
    return spec.samples - test, test


class ClassPools:
    """The dataset's sample indices grouped by class (built once per rank, O(n))."""

    def __init__(self, ds: Dataset, spec: VirtualSpec):
        y = np.asarray(ds.y).reshape(-1)
        self.classes, inverse = np.unique(y, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        sizes = np.bincount(inverse, minlength=len(self.classes))
        self.pools = np.split(order.astype(np.int64), np.cumsum(sizes)[:-1])
        self.sizes = sizes.astype(np.int64)
        self.check(spec, ds.name)

    def check(self, spec: VirtualSpec, name: str) -> None:
        """Raise DataError when agents of ``spec`` cannot be drawn from these classes."""
        C, smallest = len(self.classes), int(self.sizes.min())
        if spec.samples < 2:
            raise DataError(f"data.samples_per_agent = {spec.samples}: virtual agents need >= 2 samples (1 train, 1 test)")
        if spec.scheme == "shards":
            if spec.classes_per_agent > C:
                raise DataError(f"data.classes_per_agent = {spec.classes_per_agent} exceeds the {C} classes of {name!r}")
            per_class = -(-spec.samples // spec.classes_per_agent)
            if per_class > smallest:
                raise DataError(f"data.samples_per_agent = {spec.samples}: {per_class} distinct samples per class needed "
                                f"but the smallest class of {name!r} has {smallest}")
        elif spec.samples > smallest:
            raise DataError(f"data.samples_per_agent = {spec.samples} exceeds the smallest class of {name!r} "
                            f"({smallest} samples; a Dirichlet agent may draw all its samples from one class)")

    def agent_indices(self, spec: VirtualSpec, k: int) -> np.ndarray:
        """Agent k's sample indices (``samples`` distinct ones), test samples first."""
        g = stream(VIRTUAL_STREAM, spec.seed, k)
        C = len(self.classes)
        if spec.scheme == "shards":
            cls = g.choice(C, spec.classes_per_agent, replace=False)
            per = np.full(len(cls), spec.samples // len(cls), dtype=np.int64)
            per[:spec.samples % len(cls)] += 1
        else:
            cls = np.arange(C)
            per = g.multinomial(spec.samples, g.dirichlet(np.full(C, spec.dirichlet_alpha)))
        idx = np.concatenate([self.pools[c][g.choice(self.sizes[c], m, replace=False)]
                              for c, m in zip(cls, per) if m > 0])
        return idx[g.permutation(len(idx))]

    def indices(self, spec: VirtualSpec, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated (train, test) sample indices of agents ``ids`` (each agent's rows contiguous, in order)."""
        _, n_test = split_counts(spec)
        rows = np.stack([self.agent_indices(spec, int(k)) for k in np.asarray(ids)]) if len(ids) else \
            np.zeros((0, spec.samples), dtype=np.int64)
        return rows[:, n_test:].reshape(-1), rows[:, :n_test].reshape(-1)

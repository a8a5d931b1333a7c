"""Populations of agents: how many there are, how many samples each holds, and the tensors of any of them.

Three kinds, one interface (``num_agents``, ``counts(ids)``, ``metadata()``):

- :class:`StoredPopulation` — a disjoint partition of a dataset (data/partition.py). Resident: each
  rank copies the samples of its contiguous block of agents to its device once (``resident_block``).
- :class:`SyntheticPopulation` — FedProx Synthetic(α, β) (data/synthetic.py), and
- :class:`VirtualPopulation` — agents drawing sample indices into a shared dataset (data/virtual.py).
  Generated: agent k is a pure function of (seed, k), so any rank can build any agent. ``build(ids)``
  generates exactly the agents of a round's share or an evaluation chunk, nothing of size N.

Generated blocks use padding widths passed in by the caller (``widths`` of the whole cohort or
evaluation set, identical on every rank), so an agent's arithmetic never depends on its rank.
"""

from __future__ import annotations

import numpy as np
import torch

from mpifedmeta.federation.block import AgentBlock, aligned_width, assemble, build_block
from mpifedmeta.data import DataError, hf, load_dataset, make_partition
from mpifedmeta.data import synthetic as synth
from mpifedmeta.data import virtual as virt

VIRTUAL_PREFIX = "virtual-"


class StoredPopulation:
    """Today's disjoint partition: every agent's sample indices stored, O(N + samples).

    ``ds.x`` may be a lazy row source (data/hf.py: ArrowRows): ``resident_block`` then converts only the
    rows of the rank's agents."""
    resident = True

    def __init__(self, ds, partition, scheme: str):
        self.ds, self.partition, self.scheme = ds, partition, scheme
        self.num_agents = partition.num_agents
        self.input_shape, self.num_classes = tuple(ds.x.shape[1:]), int(ds.num_classes)
        self.train_counts = partition.train_counts()

    def counts(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        return self.train_counts[ids], self.partition.test_counts()[ids]

    def resident_block(self, lo: int, hi: int, device: torch.device, dtype: torch.dtype) -> AgentBlock:
        return build_block(self.ds.x, self.ds.y, self.partition, lo, hi, device, dtype)

    def metadata(self, num_train: int) -> tuple[dict, dict]:
        p = self.partition
        arrays = {"train_ptr": p.train_ptr, "train_idx": p.train_idx, "test_ptr": p.test_ptr, "test_idx": p.test_idx,
                  "holdout": np.arange(p.num_agents) >= num_train}
        return arrays, {"dataset": self.ds.name, "scheme": self.scheme, "num_agents": p.num_agents}


class SyntheticPopulation:
    """FedProx Synthetic(α, β) agents generated on demand from (seed, agent id)."""
    resident = False

    def __init__(self, spec: synth.SyntheticSpec, num_agents: int):
        self.spec, self.num_agents = spec, num_agents
        self.input_shape, self.num_classes = (synth.DIM,), synth.NUM_CLASSES
        self.train_counts = CohortCounts(self)

    def counts(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return synth.counts(self.spec, ids)

    def build(self, ids: np.ndarray, device: torch.device, dtype: torch.dtype,
              widths: tuple[int, int]) -> AgentBlock:
        parts = synth.generate(self.spec, ids)
        n_train, n_test = synth.split_counts(np.array([len(y) for _, y in parts], dtype=np.int64))
        empty_x, empty_y = np.zeros((0, synth.DIM)), np.zeros(0, np.int64)
        xs_tr = [x[:t] for (x, _), t in zip(parts, n_train)] or [empty_x]
        ys_tr = [y[:t] for (_, y), t in zip(parts, n_train)] or [empty_y]
        xs_te = [x[t:] for (x, _), t in zip(parts, n_train)] or [empty_x]
        ys_te = [y[t:] for (_, y), t in zip(parts, n_train)] or [empty_y]
        return assemble(ids, np.concatenate(xs_tr), np.concatenate(ys_tr), n_train, np.concatenate(xs_te),
                        np.concatenate(ys_te), n_test, widths[0], widths[1], device, dtype)

    def metadata(self, num_train: int) -> tuple[dict, dict]:
        s = self.spec
        return {}, {"dataset": "synthetic", "scheme": "synthetic-iid" if s.iid else "synthetic",
                    "num_agents": self.num_agents, "num_holdout": self.num_agents - num_train,
                    "alpha": s.alpha, "beta": s.beta, "iid": s.iid, "max_samples": s.max_samples, "seed": s.seed,
                    "num_features": synth.DIM, "num_classes": synth.NUM_CLASSES,
                    "generator": "FedProx Synthetic(alpha, beta); agent k from numpy Philox(key=(hash(seed), k))"}


class VirtualPopulation:
    """Agents whose samples are indices into one shared dataset, drawn on demand from (seed, agent id)."""
    resident = False

    def __init__(self, ds, spec: virt.VirtualSpec, num_agents: int):
        self.ds, self.spec, self.num_agents = ds, spec, num_agents
        self.pools = virt.ClassPools(ds, spec)
        self.input_shape, self.num_classes = tuple(ds.x.shape[1:]), int(ds.num_classes)
        self.train_counts = CohortCounts(self)
        self._split = virt.split_counts(spec)

    def counts(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(ids)
        return np.full(n, self._split[0], dtype=np.int64), np.full(n, self._split[1], dtype=np.int64)

    def build(self, ids: np.ndarray, device: torch.device, dtype: torch.dtype,
              widths: tuple[int, int]) -> AgentBlock:
        train_idx, test_idx = self.pools.indices(self.spec, ids)
        n_train, n_test = self.counts(ids)
        return assemble(ids, self.ds.x[train_idx], self.ds.y[train_idx], n_train, self.ds.x[test_idx],
                        self.ds.y[test_idx], n_test, widths[0], widths[1], device, dtype)

    def metadata(self, num_train: int) -> tuple[dict, dict]:
        s = self.spec
        return {}, {"dataset": self.ds.name, "scheme": VIRTUAL_PREFIX + s.scheme, "num_agents": self.num_agents,
                    "num_holdout": self.num_agents - num_train, "samples_per_agent": s.samples,
                    "classes_per_agent": s.classes_per_agent, "dirichlet_alpha": s.dirichlet_alpha,
                    "test_fraction": s.test_fraction, "seed": s.seed, "num_classes": self.num_classes,
                    "generator": "virtual agents: sample indices from numpy Philox(key=(hash(seed), k))"}


class CohortCounts:
    """Training-sample counts of a generated population, indexable like an array: ``counts[ids]`` (O(len(ids)))."""

    def __init__(self, population):
        self.population = population

    def __getitem__(self, ids) -> np.ndarray:
        return self.population.counts(np.atleast_1d(np.asarray(ids, dtype=np.int64)))[0]


def _synthetic(data, seed: int, dtype: str) -> SyntheticPopulation:
    spec = synth.SyntheticSpec(float(data.synthetic_alpha), float(data.synthetic_beta), bool(data.synthetic_iid),
                               int(data.synthetic_max_samples), seed)
    return SyntheticPopulation(spec, data.num_agents)


def _virtual(scheme: str):
    def build(ds, data, seed: int) -> VirtualPopulation:
        spec = virt.VirtualSpec(scheme, data.samples_per_agent, data.classes_per_agent, float(data.dirichlet_alpha),
                                float(data.test_fraction), seed)
        return VirtualPopulation(ds, spec, data.num_agents)
    return build


#: Generated datasets (``data.dataset``): name → builder(data section, seed, dtype) → population.
GENERATED = {"synthetic": _synthetic}
#: Virtual partitions of a loaded dataset (``data.partition``): name → builder(ds, data section, seed) → population.
VIRTUAL = {VIRTUAL_PREFIX + scheme: _virtual(scheme) for scheme in virt.SCHEMES}


def make_population(data, seed: int, dtype: str = "float32"):
    """The population of the ``[data]`` config section (``data``: a config Section); DataError if impossible."""
    if data.dataset in GENERATED:
        return GENERATED[data.dataset](data, seed, dtype)
    if hf.is_hf(data.dataset):      # its columns and splits are [data] keys; a test split for stored partitions only
        ds = hf.load(data, dtype, pooled_test=data.partition not in VIRTUAL)
    else:
        ds = load_dataset(data.dataset, data.path, dtype)
    if data.partition in VIRTUAL:
        return VIRTUAL[data.partition](ds, data, seed)
    part = make_partition(ds, data.partition, data.num_agents, classes_per_agent=data.classes_per_agent,
                          dirichlet_alpha=data.dirichlet_alpha, test_fraction=data.test_fraction, seed=seed,
                          test_rule=getattr(data, "test_split", "auto"), min_samples=getattr(data, "min_samples", 0))
    return StoredPopulation(ds, part, data.partition)


def widths(population, ids: np.ndarray) -> tuple[int, int]:
    """Padding widths (largest train / test split, rounded up by ``block.aligned_width``) over ``ids``:
    a function of ``ids`` alone, so the same on every rank when ``ids`` is the whole cohort or evaluation set."""
    if len(ids) == 0:
        return aligned_width(1), aligned_width(1)
    tr, te = population.counts(np.asarray(ids, dtype=np.int64))
    return aligned_width(tr.max()), aligned_width(te.max())


def share(ids: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This rank's even share of ``ids`` (every size-th one, from position ``rank``); sorted if ``ids`` is."""
    return np.asarray(ids)[rank::size]


class RankAgents:
    """The blocks one rank computes on, for a round, an evaluation, the stationarity diagnostic and
    the strategy timing: its resident block (stored partitions), or blocks of generated agents
    built on demand from its even share (padded to widths of the whole set: rank-independent bits)."""

    def __init__(self, population, block: AgentBlock | None, rank: int, size: int, device: torch.device,
                 dtype: torch.dtype, eval_ids: np.ndarray, eval_chunk: int, num_train: int):
        self.population, self.block, self.rank, self.size = population, block, rank, size
        self.device, self.dtype, self.eval_chunk, self.num_train = device, dtype, eval_chunk, num_train
        self.eval_widths = (1, 1) if block is not None else widths(population, eval_ids)

    def _build(self, ids: np.ndarray, w: tuple[int, int]) -> AgentBlock:
        return self.population.build(ids, self.device, self.dtype, w)

    def for_round(self, cohort: np.ndarray) -> AgentBlock:
        """The block a round runs on: the resident block, or this rank's share of the cohort."""
        if self.block is not None:
            return self.block
        return self._build(share(cohort, self.rank, self.size), widths(self.population, cohort))

    def for_evaluation(self, ids: np.ndarray):
        """Blocks holding this rank's evaluated agents: the resident block, or built chunks of its share."""
        if self.block is not None:
            yield self.block
            return
        mine = share(ids, self.rank, self.size)
        for start in range(0, len(mine), self.eval_chunk):
            yield self._build(mine[start:start + self.eval_chunk], self.eval_widths)

    def for_stationarity(self):
        """Blocks covering all training agents once over the ranks (generated: chunk c on rank c mod P; O(N))."""
        if self.block is not None:
            yield self.block
            return
        chunk = self.eval_chunk
        for c in range(self.rank, -(-self.num_train // chunk), self.size):
            ids = np.arange(c * chunk, min((c + 1) * chunk, self.num_train), dtype=np.int64)
            yield self._build(ids, widths(self.population, ids))

    def for_timing(self, agents: int) -> AgentBlock:
        """A block of at least ``agents`` agents (if there are) to time the strategies on."""
        if self.block is not None:
            return self.block
        first = np.arange(min(agents, self.num_train), dtype=np.int64)
        return self._build(first, widths(self.population, first))


__all__ = ["RankAgents", "StoredPopulation", "SyntheticPopulation", "VirtualPopulation", "CohortCounts", "make_population",
           "GENERATED", "VIRTUAL", "widths", "share", "DataError"]

"""Federated partitions of a :class:`Dataset` over N agents (pure numpy, vectorized).

A :class:`Partition` is stored in CSR form: agent ``a``'s training samples are
``train_idx[train_ptr[a]:train_ptr[a + 1]]`` (indices into the dataset arrays),
likewise for ``test``.  Every scheme is deterministic given ``seed`` and runs
without per-agent Python loops (loops only over classes), so 10^5-10^6 agents
are cheap.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .loaders import DataError, Dataset

__all__ = ["Partition", "make_partition", "SCHEMES"]

_MIN_SAMPLES = 2  # every agent needs >= 1 train and >= 1 test sample


@dataclass(frozen=True, eq=False)
class Partition:
    """CSR partition of sample indices over agents 0..N-1."""

    train_ptr: np.ndarray
    train_idx: np.ndarray
    test_ptr: np.ndarray
    test_idx: np.ndarray

    @property
    def num_agents(self) -> int:
        return int(self.train_ptr.shape[0]) - 1

    def train_counts(self) -> np.ndarray:
        return np.diff(self.train_ptr).astype(np.int64, copy=False)

    def test_counts(self) -> np.ndarray:
        return np.diff(self.test_ptr).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- helpers
def _ptr(counts: np.ndarray) -> np.ndarray:
    ptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


def _group_sorted(idx: np.ndarray, owner: np.ndarray, n_agents: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (ptr, idx) of sample indices ``idx`` owned by ``owner``, ascending within each agent."""
    order = np.lexsort((idx, owner))
    counts = np.bincount(owner, minlength=n_agents).astype(np.int64)
    return _ptr(counts), np.ascontiguousarray(idx[order], dtype=np.int64)


def _describe_agents(agents: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(a)) for a in agents[:limit])
    more = f", ... ({agents.shape[0]} agents in all)" if agents.shape[0] > limit else ""
    return shown + more


def _agent_counts(owner: np.ndarray, n_agents: int) -> np.ndarray:
    """Samples per agent; DataError unless every agent has >= 1 train and >= 1 test sample's worth."""
    counts = np.bincount(owner, minlength=n_agents).astype(np.int64)
    small = np.flatnonzero(counts < _MIN_SAMPLES)
    if small.shape[0]:
        raise DataError(
            f"agent(s) {_describe_agents(small)} got fewer than {_MIN_SAMPLES} samples "
            f"(need >= 1 train and >= 1 test sample each); use fewer agents"
        )
    return counts


def _test_counts(counts: np.ndarray, test_fraction: float) -> np.ndarray:
    """round(test_fraction * n_a) test samples per agent, kept in [1, n_a - 1]."""
    n_test = np.floor(test_fraction * counts + 0.5).astype(np.int64)
    np.clip(n_test, 1, counts - 1, out=n_test)
    return n_test


def _split(agent_of: np.ndarray, n_agents: int, test_fraction: float, rng: np.random.Generator) -> Partition:
    """Per-agent random train/test split; ``agent_of[i] == -1`` means sample i is unused."""
    sel = np.flatnonzero(agent_of >= 0).astype(np.int64)
    owner = agent_of[sel]
    counts = _agent_counts(owner, n_agents)
    key = rng.random(sel.shape[0])
    order = np.lexsort((key, owner))
    s_idx, s_own = sel[order], owner[order]
    ptr = _ptr(counts)
    n_test = _test_counts(counts, test_fraction)
    pos = np.arange(s_idx.shape[0], dtype=np.int64) - ptr[s_own]
    is_test = pos < n_test[s_own]
    test_ptr, test_idx = _group_sorted(s_idx[is_test], s_own[is_test], n_agents)
    train_ptr, train_idx = _group_sorted(s_idx[~is_test], s_own[~is_test], n_agents)
    return Partition(train_ptr=train_ptr, train_idx=train_idx, test_ptr=test_ptr, test_idx=test_idx)


def _split_last(agent_of: np.ndarray, n_agents: int, test_fraction: float) -> Partition:
    """Per-agent temporal split: an agent's last round(test_fraction * n_a) samples in row order are its
    test split (rows in time order, e.g. Shakespeare's text windows: a random split would test on windows
    that overlap the training ones)."""
    sel = np.flatnonzero(agent_of >= 0).astype(np.int64)
    owner = agent_of[sel]
    counts = _agent_counts(owner, n_agents)
    order = np.argsort(owner, kind="stable")           # each agent's rows in row order
    s_idx, s_own = sel[order], owner[order]
    pos = np.arange(s_idx.shape[0], dtype=np.int64) - _ptr(counts)[s_own]
    is_test = pos >= (counts - _test_counts(counts, test_fraction))[s_own]
    test_ptr, test_idx = _group_sorted(s_idx[is_test], s_own[is_test], n_agents)
    train_ptr, train_idx = _group_sorted(s_idx[~is_test], s_own[~is_test], n_agents)
    return Partition(train_ptr=train_ptr, train_idx=train_idx, test_ptr=test_ptr, test_idx=test_idx)


# --------------------------------------------------------------------------- schemes
def _iid(n: int, n_agents: int, rng: np.random.Generator) -> np.ndarray:
    base, extra = divmod(n, n_agents)
    counts = np.full(n_agents, base, dtype=np.int64)
    counts[:extra] += 1
    agent_of = np.empty(n, dtype=np.int64)
    agent_of[rng.permutation(n)] = np.repeat(np.arange(n_agents, dtype=np.int64), counts)
    return agent_of


def _shards(y: np.ndarray, num_classes: int, n_agents: int, cpa: int, rng: np.random.Generator) -> np.ndarray:
    classes, cls = np.unique(y, return_inverse=True)  # only classes present in the data
    cls = cls.astype(np.int64).reshape(-1)
    n_cls = classes.shape[0]
    if cpa < 1 or cpa > n_cls:
        raise DataError(
            f"shards: classes_per_agent={cpa} must be in 1..{n_cls} "
            f"(the dataset has num_classes={num_classes}, {n_cls} of them present)"
        )
    # Balanced cyclic assignment: slot p = a*cpa + j takes class (p mod C).  The cycle repeats
    # every L = lcm(C, cpa) slots, i.e. every g = L/cpa agents; each such group of agents uses every
    # class exactly L/C times, so relabelling the classes with an independent random permutation per
    # group keeps the assignment balanced (per-class agent counts differ by <= 1) and each agent's
    # cpa classes distinct, while mixing which classes go together.
    period = math.lcm(n_cls, cpa)
    g = period // cpa
    n_groups = -(-n_agents // g)
    sigma = np.argsort(rng.random((n_groups, n_cls)), axis=1)
    a = np.arange(n_agents, dtype=np.int64)
    slots = (a % g)[:, None] * cpa + np.arange(cpa, dtype=np.int64)[None, :]
    agent_cls = sigma[(a // g)[:, None], slots % n_cls]  # (N, cpa) class indices, distinct per row
    pair_agent = np.repeat(a, cpa)
    pair_cls = agent_cls.reshape(-1)
    # Holders of each class, grouped by class.
    h_order = np.argsort(pair_cls, kind="stable")
    holders = pair_agent[h_order]
    h_cnt = np.bincount(pair_cls, minlength=n_cls).astype(np.int64)
    h_ptr = _ptr(h_cnt)
    n_cnt = np.bincount(cls, minlength=n_cls).astype(np.int64)
    bad = np.flatnonzero(h_cnt > n_cnt)
    if bad.shape[0]:
        c = int(bad[0])
        raise DataError(
            f"shards: class {int(classes[c])} has {int(n_cnt[c])} samples but {int(h_cnt[c])} agents hold it; "
            f"use fewer agents or fewer classes_per_agent"
        )
    # Split each class's samples (random order) evenly among its holders.
    key = rng.random(cls.shape[0])
    order = np.lexsort((key, cls))
    s_cls = cls[order]
    n_ptr = _ptr(n_cnt)
    rank = np.arange(order.shape[0], dtype=np.int64) - n_ptr[s_cls]
    held = h_cnt[s_cls] > 0
    hsel = (rank[held] * h_cnt[s_cls[held]]) // n_cnt[s_cls[held]]
    agent_of = np.full(cls.shape[0], -1, dtype=np.int64)
    agent_of[order[held]] = holders[h_ptr[s_cls[held]] + hsel]
    return agent_of


def _dirichlet_proportions(alpha: float, n_agents: int, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet(alpha, ..., alpha) drawn in log space (no underflow/NaN even for tiny alpha).

    Uses Gamma(alpha) = Gamma(alpha + 1) * U**(1/alpha).
    """
    with np.errstate(divide="ignore"):
        logg = np.log(rng.gamma(alpha + 1.0, size=n_agents)) + np.log(rng.random(n_agents)) / alpha
    logg -= logg.max()
    p = np.exp(logg)
    p /= p.sum()
    return p


def _dirichlet(y: np.ndarray, n_agents: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    n = y.shape[0]
    if n < _MIN_SAMPLES * n_agents:
        raise DataError(
            f"dirichlet: {n} samples cannot give each of {n_agents} agents >= {_MIN_SAMPLES} samples; use fewer agents"
        )
    agent_of = np.empty(n, dtype=np.int64)
    agent_ids = np.arange(n_agents, dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.shape[0])]
        p = _dirichlet_proportions(alpha, n_agents, rng)
        cuts = np.floor(np.cumsum(p) * idx.shape[0]).astype(np.int64)
        np.clip(cuts, 0, idx.shape[0], out=cuts)
        cuts[-1] = idx.shape[0]
        counts = np.diff(cuts, prepend=0)
        agent_of[idx] = np.repeat(agent_ids, counts)
    _rebalance_min(agent_of, n_agents, _MIN_SAMPLES, rng)
    return agent_of


def _rebalance_min(agent_of: np.ndarray, n_agents: int, min_count: int, rng: np.random.Generator) -> None:
    """Deterministically move samples from the largest agents to agents below ``min_count`` (in place).

    Water-filling: donors are cut down from the top to a common level L >= min_count, so the
    samples taken come from the largest agents and no donor drops below ``min_count``.
    Requires len(agent_of) >= min_count * n_agents.
    """
    counts = np.bincount(agent_of, minlength=n_agents).astype(np.int64)
    moved = _move_to(agent_of, n_agents, np.maximum(min_count - counts, 0), min_count, rng)
    assert moved, "len(agent_of) >= min_count * n_agents"


def _move_to(agent_of: np.ndarray, n_agents: int, need: np.ndarray, floor: int, rng: np.random.Generator) -> bool:
    """Give agent a ``need[a]`` more samples (in place), taken from the agents holding the most, by
    water-filling down to a common level >= ``floor``; False (nothing moved) if they cannot spare that many."""
    counts = np.bincount(agent_of, minlength=n_agents).astype(np.int64)
    total = int(need.sum())
    if total == 0:
        return True
    take = _takes(counts, total, floor, rng)
    if take is None:
        return False
    _give(agent_of, n_agents, counts, take, need, rng)
    return True


def _takes(counts: np.ndarray, total: int, floor: int, rng: np.random.Generator) -> np.ndarray | None:
    """How many samples to take from each agent, ``total`` in all, from the largest ``counts`` down to a
    common level >= ``floor`` (water-filling); None if they cannot spare that many."""
    def excess(level: int) -> int:
        return int(np.maximum(counts - level, 0).sum())

    if excess(floor) < total:
        return None
    lo, hi = floor, int(counts.max())  # excess(lo) >= total; excess(hi) == 0 < total
    while hi - lo > 1:  # largest level L with excess(L) >= total
        mid = (lo + hi) // 2
        if excess(mid) >= total:
            lo = mid
        else:
            hi = mid
    level = lo
    take = np.maximum(counts - (level + 1), 0)
    rem = total - int(take.sum())
    cand = np.flatnonzero(counts >= level + 1)
    take[cand[rng.permutation(cand.shape[0])[:rem]]] += 1
    return take


def _give(agent_of: np.ndarray, n_agents: int, counts: np.ndarray, take: np.ndarray, need: np.ndarray,
          rng: np.random.Generator) -> None:
    """Move ``take[a]`` random samples of each agent a (``counts``: its samples in ``agent_of``) to the
    agents b in need, ``need[b]`` each (in place)."""
    # Remove each donor's last `take` samples in a random per-agent order.
    n = agent_of.shape[0]
    order = np.lexsort((rng.random(n), agent_of))
    s_own = agent_of[order]
    rank = np.arange(n, dtype=np.int64) - _ptr(counts)[s_own]
    moved = order[rank >= (counts - take)[s_own]]
    moved = moved[rng.permutation(moved.shape[0])]
    agent_of[moved] = np.repeat(np.arange(n_agents, dtype=np.int64), need)


class _RowsOf:
    """Rows ``rows`` of an array-like (numpy or a lazy row source), indexed like an array, copying nothing."""

    def __init__(self, x, rows: np.ndarray):
        self.x, self.rows = x, rows
        self.shape, self.dtype = (rows.shape[0],) + tuple(x.shape[1:]), x.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        return self.x[self.rows[idx]]


def _preferred_classes(owner: np.ndarray, labels: np.ndarray, agents: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Each of the sorted ``agents``' most frequent label among its samples, of the ``allowed`` labels
    (ties, and an agent with none of them: the smallest allowed label)."""
    sel = np.isin(owner, agents) & np.isin(labels, allowed)
    table = np.zeros((agents.shape[0], allowed.shape[0]), dtype=np.int64)
    np.add.at(table, (np.searchsorted(agents, owner[sel]), np.searchsorted(allowed, labels[sel])), 1)
    return allowed[np.argmax(table, axis=1)]


def _share_test(owner: np.ndarray, train_y: np.ndarray, test_y: np.ndarray, n_agents: int,
                rng: np.random.Generator) -> np.ndarray:
    """The agent of every pooled test sample (-1: unused), following each agent's training label counts.

    Per class c, its test samples (in random order) are cut among the agents (in random order) in
    proportion to their training samples of class c, so that an agent's test split has its training label
    distribution; test samples of a class no agent trains on are unused. An agent left with no test sample
    then gets one of its most frequent training class (of those with test samples), taken from the agents
    holding the most test samples of that class (water-filling; a donor keeps >= 1 test sample)."""
    agent_of = np.full(test_y.shape[0], -1, dtype=np.int64)
    for c in np.unique(test_y):
        at = np.flatnonzero(test_y == c)
        at = at[rng.permutation(at.shape[0])]
        weight = np.bincount(owner[train_y == c], minlength=n_agents).astype(np.int64)
        total = int(weight.sum())
        if total:
            order = rng.permutation(n_agents)
            cuts = np.cumsum(weight[order]) * at.shape[0] // total
            agent_of[at] = np.repeat(order, np.diff(cuts, prepend=0))
    held = np.bincount(agent_of[agent_of >= 0], minlength=n_agents)
    needy = np.flatnonzero(held == 0)
    if needy.shape[0] == 0:
        return agent_of
    prefer = _preferred_classes(owner, train_y, needy, np.unique(test_y))
    for c in np.unique(prefer):
        takers = needy[prefer == c]
        at = np.flatnonzero((test_y == c) & (agent_of >= 0))
        counts = np.bincount(agent_of[at], minlength=n_agents).astype(np.int64)
        spare = np.minimum(counts, held - 1)        # a donor keeps one test sample
        np.maximum(spare, 0, out=spare)
        take = _takes(spare, takers.shape[0], 0, rng)
        if take is None:
            raise DataError(
                f"pooled test split: agent(s) {_describe_agents(takers)} get no test sample and the test split's "
                f"{at.shape[0]} samples of their class {int(c)} cannot spare one each; use fewer agents")
        need = np.zeros(n_agents, dtype=np.int64)
        need[takers] = 1
        sub = agent_of[at]
        _give(sub, n_agents, counts, take, need, rng)
        agent_of[at] = sub
        held = np.bincount(agent_of[agent_of >= 0], minlength=n_agents)
    return agent_of


def _pooled(ds: Dataset, scheme: str, n_agents: int, o: "PartitionOptions", rng: np.random.Generator) -> Partition:
    """A scheme over the training rows (``~ds.test``), every sample of an agent training; the pooled test
    rows (``ds.test``) shared among the agents by _share_test."""
    y, test = _labels(ds), np.asarray(ds.test, dtype=bool).reshape(-1)
    rows, pool = np.flatnonzero(~test).astype(np.int64), np.flatnonzero(test).astype(np.int64)
    train_ds = Dataset(x=_RowsOf(ds.x, rows), y=y[rows], num_classes=ds.num_classes, name=ds.name)
    part = SCHEMES[scheme](train_ds, n_agents, o, rng)
    ids = np.arange(n_agents, dtype=np.int64)
    owner = np.concatenate([np.repeat(ids, part.train_counts()), np.repeat(ids, part.test_counts())])
    mine = rows[np.concatenate([part.train_idx, part.test_idx])]
    train_ptr, train_idx = _group_sorted(mine, owner, n_agents)
    test_of = _share_test(owner, y[mine], y[pool], n_agents, rng)
    used = test_of >= 0
    test_ptr, test_idx = _group_sorted(pool[used], test_of[used], n_agents)
    return Partition(train_ptr=train_ptr, train_idx=train_idx, test_ptr=test_ptr, test_idx=test_idx)


def _natural(ds: Dataset, num_agents: int, test_fraction: float, rng: np.random.Generator,
             test_rule: str = "random", min_samples: int = 0) -> Partition:
    if ds.agent is None:
        raise DataError(f"natural: dataset {ds.name!r} has no 'agent' array (npz files with key 'agent', your "
                        "loader's 'agent', or a Hugging Face dataset's data.agent_column)")
    ids, owner = np.unique(np.asarray(ds.agent), return_inverse=True)
    owner = owner.astype(np.int64).reshape(-1)
    if min_samples > 0:         # agents with fewer samples are left out (their samples unused), the others renumbered
        keep = np.bincount(owner, minlength=ids.shape[0]) >= min_samples
        if not keep.any():
            raise DataError(f"natural: no agent of dataset {ds.name!r} has min_samples = {min_samples} samples")
        owner = np.where(keep[owner], np.cumsum(keep)[owner] - 1, -1)
        ids = ids[keep]
    n_agents = int(ids.shape[0])
    if num_agents not in (0, n_agents):
        raise DataError(
            f"natural: num_agents={num_agents} but the dataset has {n_agents} distinct agent ids "
            f"(set num_agents to {n_agents} or 0)"
        )
    if ds.test is None:
        if test_rule == "last":
            return _split_last(owner, n_agents, test_fraction)
        return _split(owner, n_agents, test_fraction, rng)
    test = np.asarray(ds.test, dtype=bool).reshape(-1)
    if test.shape[0] != owner.shape[0]:
        raise DataError(f"natural: dataset 'test' has {test.shape[0]} entries but 'agent' has {owner.shape[0]}")
    idx = np.arange(owner.shape[0], dtype=np.int64)
    used = owner >= 0
    test_ptr, test_idx = _group_sorted(idx[test & used], owner[test & used], n_agents)
    train_ptr, train_idx = _group_sorted(idx[~test & used], owner[~test & used], n_agents)
    for what, ptr in (("training", train_ptr), ("test", test_ptr)):
        empty = np.flatnonzero(np.diff(ptr) == 0)
        if empty.shape[0]:
            raise DataError(
                f"natural: agent id(s) {_describe_agents(ids[empty])} have no {what} samples in the 'test' array; "
                f"every agent needs >= 1 training and >= 1 test sample"
            )
    return Partition(train_ptr=train_ptr, train_idx=train_idx, test_ptr=test_ptr, test_idx=test_idx)


# --------------------------------------------------------------------------- schemes
@dataclass(frozen=True)
class PartitionOptions:
    """The scheme parameters of :func:`make_partition` (each scheme reads the ones it needs)."""
    classes_per_agent: int
    dirichlet_alpha: float
    test_fraction: float
    test_rule: str = "random"     # natural: "random" or "last" (an agent's last samples are its test split)
    min_samples: int = 0          # natural: agents with fewer samples are left out (0: keep all)


def _labels(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.y).reshape(-1)


def _scheme_iid(ds: Dataset, n_agents: int, o: PartitionOptions, rng: np.random.Generator) -> Partition:
    return _split(_iid(_labels(ds).shape[0], n_agents, rng), n_agents, o.test_fraction, rng)


def _scheme_shards(ds: Dataset, n_agents: int, o: PartitionOptions, rng: np.random.Generator) -> Partition:
    cpa = _as_int(o.classes_per_agent, "classes_per_agent")
    agent_of = _shards(_labels(ds), int(ds.num_classes), n_agents, cpa, rng)
    return _split(agent_of, n_agents, o.test_fraction, rng)


def _scheme_dirichlet(ds: Dataset, n_agents: int, o: PartitionOptions, rng: np.random.Generator) -> Partition:
    agent_of = _dirichlet(_labels(ds), n_agents, o.dirichlet_alpha, rng)
    return _split(agent_of, n_agents, o.test_fraction, rng)


def _scheme_natural(ds: Dataset, n_agents: int, o: PartitionOptions, rng: np.random.Generator) -> Partition:
    return _natural(ds, n_agents, o.test_fraction, rng, o.test_rule, o.min_samples)


Partitioner = Callable[[Dataset, int, PartitionOptions, np.random.Generator], Partition]
#: Scheme name → partitioner(ds, num_agents, options, rng). Adding a scheme = one function + one entry.
SCHEMES: dict[str, Partitioner] = {
    "iid": _scheme_iid,
    "shards": _scheme_shards,
    "dirichlet": _scheme_dirichlet,
    "natural": _scheme_natural,
}


# --------------------------------------------------------------------------- entry point
def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise DataError(f"{what} must be an integer, got {value!r}") from None


def make_partition(
    ds: Dataset,
    scheme: str,
    num_agents: int,
    *,
    classes_per_agent: int = 2,
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    test_rule: str = "auto",
    min_samples: int = 0,
) -> Partition:
    """Partition ``ds`` over ``num_agents`` agents with ``scheme`` (a key of SCHEMES).

    iid: random, as even as possible.  shards: each agent holds exactly ``classes_per_agent``
    distinct classes (balanced over classes), each class split evenly among its holders.
    dirichlet: per class, agent proportions ~ Dirichlet(``dirichlet_alpha``); then samples are moved
    from the largest agents so every agent has >= 2 samples.  natural: the dataset's ``agent`` ids
    (``num_agents`` 0 = take the count from the data); its ``test`` array, if any, fixes the split.
    Otherwise every agent's samples are split with round(test_fraction * n_a) (>= 1) test samples
    and >= 1 training sample: at random, or (natural, ``test_rule`` "last", or "auto" on a temporal
    dataset) the agent's last samples in row order; ``min_samples`` > 0 leaves the natural agents with
    fewer samples out.  A dataset with a ``test`` array and no ``agent``
    (a Hugging Face ``test`` split) is a pooled test set: the scheme partitions the other rows, all of an
    agent's samples train, and the test rows are shared by _share_test.  Deterministic given ``seed``.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    num_agents = _as_int(num_agents, "num_agents")
    seed = _as_int(seed, "seed")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    try:
        test_fraction = float(test_fraction)
        dirichlet_alpha = float(dirichlet_alpha)
    except (TypeError, ValueError):
        raise DataError(
            f"test_fraction and dirichlet_alpha must be numbers, got {test_fraction!r} and {dirichlet_alpha!r}"
        ) from None
    if not (0.0 < test_fraction < 1.0):
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not (dirichlet_alpha > 0.0 and math.isfinite(dirichlet_alpha)):
        raise DataError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    if test_rule not in ("auto", "random", "last"):
        raise DataError(f"test_rule must be auto, random or last, got {test_rule!r}")
    if test_rule == "auto":
        test_rule = "last" if ds.temporal else "random"
    pooled = ds.test is not None and ds.agent is None and scheme != "natural"
    n = int(_labels(ds).shape[0]) - (int(np.count_nonzero(ds.test)) if pooled else 0)
    min_agents = 0 if scheme == "natural" else 1
    if num_agents < min_agents:
        zero = " (or 0 for natural = take it from the data)" if scheme == "natural" else ""
        raise DataError(f"num_agents must be >= 1{zero}, got {num_agents}")
    if num_agents > n:
        raise DataError(f"num_agents={num_agents} exceeds the number of samples ({n}) in dataset {ds.name!r}")
    opts = PartitionOptions(classes_per_agent, dirichlet_alpha, test_fraction, test_rule,
                            _as_int(min_samples, "min_samples"))
    if pooled:
        return _pooled(ds, scheme, num_agents, opts, np.random.default_rng(seed))
    return SCHEMES[scheme](ds, num_agents, opts, np.random.default_rng(seed))

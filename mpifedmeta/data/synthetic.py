"""FedProx / LEAF Synthetic(α, β): agent k's data as a pure function of (seed, k) (pure numpy).

The generator of Li et al. (FedProx, 2020), per agent k, d = 60 features, 10 classes:

    u_k ~ N(0, α²)                    W_k (60×10), b_k (10) ~ N(u_k, 1)
    B_k ~ N(0, β²)                    v_k (60) ~ N(B_k, 1)
    x ~ N(v_k, Σ), Σ = diag(j^-1.2)   y = argmax softmax(x W_k + b_k)
    n_k = min(int(lognormal(4, 2)) + 50, max_samples);  the first ⌊9 n_k / 10⌋ samples train, the rest test

The iid variant (FedProx's synthetic_iid) shares one W, b ~ N(0, 1) (drawn from the seed alone)
between all agents and uses v_k = B_k·1.

Every agent draws from its own counter-based stream, ``Philox(key = (hash(seed), k))``, so its
data never depends on which other agents are generated with it, on which rank, or in which
round: nothing of size N is ever generated or held. The draws are made in a fixed order (n_k
first, so that counting samples needs one draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpifedmeta.core import rng as _rng

DIM, NUM_CLASSES = 60, 10
MIN_SAMPLES = 50                  # FedProx: int(lognormal(4, 2)) + 50
SIGMA_DIAG = np.arange(1, DIM + 1, dtype=np.float64) ** -1.2
_SQRT_SIGMA = np.sqrt(SIGMA_DIAG)
AGENT_STREAM, GLOBAL_STREAM = 0x5E7A, 0x5E7B


@dataclass(frozen=True)
class SyntheticSpec:
    """The generator's parameters (everything a population of any size depends on)."""
    alpha: float
    beta: float
    iid: bool
    max_samples: int
    seed: int


def stream(purpose: int, seed: int, k: int) -> np.random.Generator:
    """The counter-based generator of (purpose, seed, k): Philox keyed by (hash(purpose, seed), k)."""
    return np.random.Generator(np.random.Philox(key=(_rng.key(purpose, seed) << 64) | int(k)))


def _num_samples(g: np.random.Generator, cap: int) -> int:
    return min(int(g.lognormal(4.0, 2.0)) + MIN_SAMPLES, cap)


def split_counts(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FedProx's 90/10 split of n samples: (train, test) = (⌊9n/10⌋, n − ⌊9n/10⌋); n ≥ 2 gives ≥ 1 each."""
    n = np.asarray(n, dtype=np.int64)
    train = (9 * n) // 10
    return train, n - train


def counts(spec: SyntheticSpec, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sample counts of agents ``ids`` (int64 arrays); one draw per agent."""
    n = np.fromiter((_num_samples(stream(AGENT_STREAM, spec.seed, k), spec.max_samples) for k in np.asarray(ids)),
                    dtype=np.int64, count=len(ids))
    return split_counts(n)


def global_model(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """The iid variant's shared W (60×10), b (10) ~ N(0, 1), drawn from the seed alone."""
    g = stream(GLOBAL_STREAM, spec.seed, 0)
    return g.normal(0.0, 1.0, (DIM, NUM_CLASSES)), g.normal(0.0, 1.0, NUM_CLASSES)


@dataclass(frozen=True)
class AgentLaw:
    """Agent k's hidden parameters: its sample count, u_k, B_k, W_k, b_k, v_k."""
    n: int
    u: float
    B: float
    W: np.ndarray
    b: np.ndarray
    v: np.ndarray


def agent_law(spec: SyntheticSpec, k: int, shared: tuple | None = None) -> tuple[AgentLaw, np.random.Generator]:
    """Agent k's parameters and its stream positioned at the first sample draw."""
    g = stream(AGENT_STREAM, spec.seed, k)
    n = _num_samples(g, spec.max_samples)
    u = g.normal(0.0, spec.alpha)
    B = g.normal(0.0, spec.beta)
    if spec.iid:
        W, b = shared if shared is not None else global_model(spec)
        v = np.full(DIM, B)
    else:
        W = g.normal(u, 1.0, (DIM, NUM_CLASSES))
        b = g.normal(u, 1.0, NUM_CLASSES)
        v = g.normal(B, 1.0, DIM)
    return AgentLaw(n, u, B, W, b, v), g


def agent_samples(spec: SyntheticSpec, k: int, shared: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Agent k's samples: x (n_k, 60) float64, y (n_k,) int64 — train rows first, then test rows."""
    law, g = agent_law(spec, k, shared)
    x = law.v + g.standard_normal((law.n, DIM)) * _SQRT_SIGMA
    # argmax of softmax = argmax of the logits. The product is always this agent's own (n_k×60)(60×10)
    # call with the same values, whoever else is generated: the same bits on any rank.
    y = np.argmax(x @ law.W + law.b, axis=1).astype(np.int64)
    return x, y


def generate(spec: SyntheticSpec, ids: np.ndarray):
    """Samples of agents ``ids``: lists of per-agent (x, y) in the order of ``ids`` (O(Σ n_k))."""
    shared = global_model(spec) if spec.iid else None
    return [agent_samples(spec, int(k), shared) for k in np.asarray(ids)]

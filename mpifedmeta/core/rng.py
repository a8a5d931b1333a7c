"""Counter-based randomness: every random draw is a pure function of (seed, round, agent, step, ...).

This makes results independent of how agents are spread over MPI ranks, and makes resume exact
with no generator state to store: a checkpoint only needs the round number.
"""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
# Purposes, mixed into the key so that different uses never share a stream.
COHORT, BATCH, EVAL_AGENTS, EVAL_HOLDOUT = 0xC0407, 0xBA7C4, 0xE7A1, 0xE7A2
POISSON_COHORT, NOISE = 0xC0408, 0xD9015


def _mul32(x, c: int):
    """(x · c) mod 2³² for 0 ≤ x < 2³², using only int64 products below 2⁶³ (no overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x):
    """The 'lowbias32' integer hash (C. Wellons) on int64 tensors/arrays/ints holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def key(*parts: int) -> int:
    """Mix integers (any size ≥ 0) into one 32-bit key."""
    h = 0x9E3779B9
    for p in parts:
        p = int(p)
        while True:
            h = hash32(h ^ (p & MASK32))
            p >>= 32
            if p == 0:
                break
    return h


def cohort(seed: int, round_: int, num_train_agents: int, size: int) -> np.ndarray:
    """The sorted agent ids sampled in ``round_`` (identical on every rank).

    O(size) work and memory when size ≤ N/50 or N ≤ 10⁴ (numpy's Generator.choice without replacement
    then uses Floyd's algorithm; otherwise a partial shuffle of N ids), so a cohort of 10³ out of 10⁷
    agents costs microseconds and no array of size N (tests/test_population.py checks it)."""
    rng = np.random.default_rng([COHORT, seed, round_])
    return np.sort(rng.choice(num_train_agents, size=size, replace=False)).astype(np.int64)


def poisson_cohort(seed: int, round_: int, num_train_agents: int, probability: float) -> np.ndarray:
    """The sorted agent ids of a Poisson-sampled round: every agent joins independently with
    ``probability`` (identical on every rank; may be empty). Drawn as a Binomial(N, q) size, then a
    uniform subset of that size — the same distribution as N coin flips, in O(cohort) work."""
    rng = np.random.default_rng([POISSON_COHORT, seed, round_])
    size = int(rng.binomial(num_train_agents, probability))
    return np.sort(rng.choice(num_train_agents, size=size, replace=False)).astype(np.int64)


def batch_indices(seed: int, round_: int, agents: torch.Tensor, counts: torch.Tensor,
                  steps: int, slots: int, batch: int) -> torch.Tensor:
    """Per-agent sample positions in [0, count_i), drawn uniformly with replacement.

    ``agents``: global ids (B,), ``counts``: training-sample counts (B,), int64 on any device.
    Returns (B, steps, slots, batch) int64; the value for a given (agent, step, slot, j) does not
    depend on which other agents are in the block.
    """
    dev = agents.device
    h = hash32(agents.view(-1, 1, 1, 1) ^ key(BATCH, seed, round_))
    h = hash32(h ^ torch.arange(steps, device=dev).view(1, -1, 1, 1))
    h = hash32(h ^ (torch.arange(slots, device=dev).view(1, 1, -1, 1) + 0x5100))
    h = hash32(h ^ (torch.arange(batch, device=dev).view(1, 1, 1, -1) + 0xB000000))
    return (h * counts.view(-1, 1, 1, 1)) >> 32

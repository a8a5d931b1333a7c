"""Order-independent exact summation, so that the FedAvg average is bit-identical for any number
of MPI ranks: every term is rounded ONCE to a fixed grid and summed as integers (integer
addition is associative, so local sums and the MPI Allreduce give the same bits in any order).

Two encodings:

- :func:`encode_displacements` (the round's average, one int64 per parameter): the local models
  as integer-weighted displacements c_i·(θ_i − w) from the global model w, on the grid 2^-k with
  k = :func:`grid_bits` (C = Σ c_i over the cohort). Every parameter of a model that has not
  diverged is below 2¹⁶ in magnitude, so |θ_i − w| < 2¹⁷ and the int64 sums cannot overflow.
  Error bound: each term is rounded by at most 2^-(k+1), so the average (1/C)·Σ c_i·(θ_i − w)
  is within m·2^-(k+1)/C ≤ m·2⁻⁴⁵ of the exact one for a cohort of m agents (9·10⁻¹³ for m = 32,
  2.8·10⁻¹¹ for m = 1000; tests/test_exactsum.py checks it against a float64 reference).
  Cost: four passes over the block's models in their own dtype (subtract, scale, round, sum
  as int64) and one range check, instead of the two-limb encoding's ~20 passes in float64.
- :func:`encode_sum` (any float64 terms |v| < 2¹⁶: the meta-loss, stationarity): two int64
  limbs on the grid 2⁻⁷², hi = ⌊v·2³²⌋ and lo = round(frac(v·2³²)·2⁴⁰) ∈ [0, 2⁴⁰]; at most 2²³
  terms per element. Values out of range or non-finite are counted by :func:`count_out_of_range`.
"""

from __future__ import annotations

import numpy as np
import torch

LIMB_BITS = 40
HI_SCALE = 2.0 ** 32        # v·2³² keeps |hi| < 2⁴⁸ for |v| < 2¹⁶
LIMIT = 2.0 ** 16
DISPLACEMENT_BITS = 17      # |θ_i − w| < 2¹⁷ when |θ_i|, |w| < 2¹⁶
SUM_BITS = 62               # the int64 sums stay below 2⁶²


def grid_bits(total_weight: int) -> int:
    """k of the displacement grid 2^-k for integer weights summing to ``total_weight`` (C):
    C·2¹⁷·2^k ≤ 2⁶², so Σ c_i·|θ_i − w|·2^k fits in an int64 whatever the order of the sum."""
    if total_weight < 1:
        raise ValueError(f"the cohort's total weight must be >= 1, got {total_weight}")
    return SUM_BITS - DISPLACEMENT_BITS - (int(total_weight) - 1).bit_length()


def encode_displacements(theta: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i round(scale_i·(θ_i − w)) over the rows of ``theta`` (n, d) as int64 (d,), and a 0-dim
    int64 flag: 1 if any value of ``theta`` is non-finite or of magnitude ≥ 2¹⁶ (the sum is then
    garbage and the round diverged), else 0.

    ``w``: the global model (d,) and ``scale``: (n,) = c_i·2^k, both in ``theta``'s dtype. The
    displacement is taken in that dtype: in float32 it is exact whenever θ_i and w are within a
    factor 2 of each other (Sterbenz's lemma), else within half an ulp of it; a product with a
    non-power-of-two scale (``samples`` weighting) is rounded once to the dtype's precision.
    """
    lo, hi = torch.aminmax(theta)
    bad = (~((lo > -LIMIT) & (hi < LIMIT))).to(torch.int64)
    q = torch.sub(theta, w)
    q.mul_(scale.unsqueeze(1)).round_()
    return q.sum(0, dtype=torch.int64), bad


def decode_displacements(total: np.ndarray, w64: np.ndarray, bits: int, total_weight: int) -> np.ndarray:
    """w + Σ c_i·(θ_i − w) / C from the reduced int64 sums (float64, one deterministic rounding each)."""
    return w64 + np.asarray(total, dtype=np.int64).astype(np.float64) * (2.0 ** -bits / total_weight)


def encode_sum(values: torch.Tensor) -> torch.Tensor:
    """Exact sum over dim 0 of ``values`` (n_terms, n) → int64 limbs (2, n) on the same device."""
    s = values.to(torch.float64) * HI_SCALE
    s = torch.where(torch.isfinite(s) & (s.abs() < LIMIT * HI_SCALE), s, torch.zeros_like(s))
    hi = torch.floor(s)
    lo = torch.round((s - hi) * 2.0 ** LIMB_BITS)   # s − ⌊s⌋ is exact in float64
    return torch.stack([hi.to(torch.int64).sum(0), lo.to(torch.int64).sum(0)])


def count_out_of_range(values: torch.Tensor) -> torch.Tensor:
    """How many terms :func:`encode_sum` could not represent (non-finite or |v| ≥ 2¹⁶), as a 0-dim
    int64 tensor on the values' device (no host synchronisation)."""
    v = values.to(torch.float64)
    return (~torch.isfinite(v) | (v.abs() >= LIMIT)).sum()


def out_of_range(values: torch.Tensor) -> int:
    """:func:`count_out_of_range` as a Python int."""
    return int(count_out_of_range(values))


def decode(limbs: np.ndarray | torch.Tensor) -> np.ndarray:
    """int64 limbs (2, n) → float64 sums (n,), one deterministic rounding."""
    limbs = np.asarray(limbs.cpu() if isinstance(limbs, torch.Tensor) else limbs, dtype=np.int64)
    hi, lo = limbs[0].copy(), limbs[1].copy()
    hi += lo >> LIMB_BITS                    # normalise the carry (lo sums are ≥ 0)
    lo &= (1 << LIMB_BITS) - 1
    return hi.astype(np.float64) / HI_SCALE + lo.astype(np.float64) / 2.0 ** (LIMB_BITS + 32)

"""Order-independent exact summation, so that the FedAvg average is bit-identical for any number
of MPI ranks.

Each float64 term v (|v| < 2¹⁶) is rounded once to the fixed grid 2⁻⁷² and stored exactly as two
int64 limbs: hi = ⌊v·2³²⌋ and lo = round(frac(v·2³²)·2⁴⁰) ∈ [0, 2⁴⁰]. Integer addition is
associative, so local sums and the MPI Allreduce (SUM on int64) give the same bits in any order
and any grouping. The grid is far below float64 resolution for the weighted parameter terms
p_i·θ_i, so :func:`decode` returns the sum correctly rounded up to ~2⁻⁷² absolute.

Limits: |v| < 2¹⁶ per term (larger values or NaN/Inf are counted by :func:`out_of_range`, which
the caller treats as divergence); at most 2²³ terms per element (the lo limbs must not overflow).
"""

from __future__ import annotations

import numpy as np
import torch

LIMB_BITS = 40
HI_SCALE = 2.0 ** 32        # v·2³² keeps |hi| < 2⁴⁸ for |v| < 2¹⁶
LIMIT = 2.0 ** 16


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

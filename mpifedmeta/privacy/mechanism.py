"""The Gaussian mechanism of DP-FedAvg on a block of agents' updates.

Each agent's update Δ_i = w_i − w (over the parameters its algorithm shares; the others are zero) is
clipped to Δ̃_i = Δ_i·min(1, C/‖Δ_i‖₂) on its own rank, in the batched pass, before the exact sum.
The server update is Δ̄ = (Σ_i Δ̃_i + N(0, z²C²·I)) / m with the FIXED denominator m =
agents_per_round (the expected cohort size under Poisson sampling), uniform weights. The noise is
drawn in float64 from numpy's Philox keyed on (seed, round): every rank draws the same vector, so the
result does not depend on the number of ranks, and a resumed run draws what the straight run drew.
The seeded noise makes a SIMULATION reproducible; a deployment needs a secure random source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mpifedmeta.core import rng


@dataclass(frozen=True)
class PrivacySpec:
    """What the mechanism and the accountant need: clip C, noise multiplier z, δ, the sampling
    (poisson | fixed), the accountant (rdp | pld), the population N (training agents) and m."""
    clip: float
    noise_multiplier: float
    delta: float
    sampling: str
    accountant: str
    num_train: int
    agents_per_round: int

    @property
    def q(self) -> float:
        """The sampling probability (Poisson) or fraction (fixed) m / N."""
        return self.agents_per_round / self.num_train

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum: z·C."""
        return self.noise_multiplier * self.clip


def clip_updates(theta: torch.Tensor, w: torch.Tensor, clip: float) -> torch.Tensor:
    """The local models w + Δ̃_i with every row's update Δ_i = θ_i − w clipped to L2 norm ``clip``
    (in place on ``theta`` (B, d); returns it). The norm is accumulated in float64, one per agent."""
    theta.sub_(w)           # in place: no (B, d) temporaries (a float64 copy was 0.5 GB for 1000 MLP agents)
    norms = torch.linalg.vector_norm(theta, dim=1, dtype=torch.float64)
    factor = torch.clamp(clip / torch.clamp(norms, min=1e-300), max=1.0).to(theta.dtype)
    return theta.mul_(factor.unsqueeze(1)).add_(w)


def noise(spec: PrivacySpec, seed: int, round_: int, d: int, shared: np.ndarray | None) -> np.ndarray:
    """The round's Gaussian noise N(0, (zC)²) over the ``shared`` entries (bool (d,), None: all), float64,
    a pure function of (seed, round): the same on every rank and on resume."""
    if spec.noise_multiplier == 0:
        return np.zeros(d)
    gen = np.random.Generator(np.random.Philox(key=rng.key(rng.NOISE, seed, round_)))
    out = gen.standard_normal(d) * spec.noise_std
    if shared is not None:
        out[~shared] = 0.0
    return out

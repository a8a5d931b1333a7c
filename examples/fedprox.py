"""FedProx (Li et al., MLSys 2020) as your own algorithm: one file, one factory, nothing else touched.

    algorithm.name = "examples/fedprox.py:build"      (configs/fedprox.toml)

Each agent starts from the global model w and takes τ steps w_i ← w_i − β·(∇f_i(w_i; D_t) + mu·(w_i − w)),
then uploads w_i. The factory's keyword arguments are the algorithm's keys in [algorithm] (here ``mu``);
the local update runs batched over the whole block of agents through the engine's backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from mpifedmeta.algorithms.base import Algorithm, batch, prox_step, require, round_batches


@dataclass(frozen=True)
class FedProx(Algorithm):
    tau: int            # train.local_steps
    beta: float         # train.beta
    mu: float
    name = "fedprox"

    def local_update(self, backend, theta, state, w, X, Y, idx, mask):
        steps = round_batches(X, Y, idx, mask)              # steps(t): step t's batches, (slots, B, b, ...)
        local = backend.layout.views(theta)                 # the B agents' models, updated in place
        anchor = backend.layout.views(w.expand(theta.shape))
        losses = [prox_step(backend, local, anchor, self.mu, self.beta, *batch(steps(t), 0)) for t in range(self.tau)]
        return theta, torch.stack(losses, dim=1), None


def build(train, mu: Annotated[float, "weight of the proximal term mu/2 ||w_i - w||^2"] = 0.01) -> FedProx:
    require(mu >= 0, "mu", mu, "must be >= 0")
    return FedProx(train.local_steps, train.beta, float(mu))

"""Ditto (Li et al., ICML 2021, Alg. 1): a global model by local SGD and a personal model per agent,
kept between rounds and pulled towards the global one.

Global part: w_i ← w, τ steps w_i ← w_i − β·∇f_i(w_i; D_t), upload w_i. Personal part, on the
agent's stored v_i (the round's w at its first participation): s steps
v_i ← v_i − personal_lr·(∇f_i(v_i; D'_t) + λ·(v_i − w)); store v_i. Personalized model: v_i, or for
an agent without one s full-batch steps of the same update from v = w.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from mpifedmeta.algorithms.base import (Algorithm, Train, batch, prox_step, require, round_batches, sgd_step,
                                        state_views)


@dataclass(frozen=True)
class Ditto(Algorithm):
    tau: int
    beta: float
    lam: float
    personal_steps: int
    personal_lr: float
    name = "ditto"
    personalized = True
    stateful = True

    @property
    def steps(self) -> int:
        return max(self.tau, self.personal_steps)

    @property
    def slots(self) -> int:
        return 2                      # slot 0: the global part's batches, slot 1: the personal part's

    @property
    def models_at_once(self) -> int:
        return 4

    def state_params(self, layout):
        return tuple(range(len(layout.names)))

    def local_update(self, backend, theta, state, w, X, Y, idx, mask):
        steps = round_batches(X, Y, idx, mask)
        local, losses = backend.layout.views(theta), []
        for t in range(self.tau):
            losses.append(sgd_step(backend, local, self.beta, *batch(steps(t), 0)))
        personal = state_views(state, backend.layout, range(len(backend.layout.names)))
        anchor = backend.layout.views(w.expand(theta.shape))
        for t in range(self.personal_steps):
            prox_step(backend, personal, anchor, self.lam, self.personal_lr, *batch(steps(t), 1))
        return theta, torch.stack(losses, dim=1), state

    def personalize(self, backend, w, state, has, x, y, mask):
        n = x.shape[0]
        flat = w.expand(n, w.shape[-1]).clone()
        if has is not None and bool(has.all()):
            return state
        v, anchor = backend.layout.views(flat), backend.layout.views(w.expand(n, w.shape[-1]))
        for _ in range(self.personal_steps):
            prox_step(backend, v, anchor, self.lam, self.personal_lr, x, y, mask)
        return flat if has is None else torch.where(has.unsqueeze(1), state, flat)


def build(train: Train,
          lam: Annotated[float, "λ: weight pulling the personal model towards the global one"] = 0.1,
          personal_steps: Annotated[int | None, "s: personal steps per round (default: train.local_steps)"] = None,
          personal_lr: Annotated[float | None, "step size of the personal steps (default: train.beta)"] = None) -> Ditto:
    require(lam >= 0, "lam", lam, "must be >= 0")
    require(personal_steps is None or personal_steps > 0, "personal_steps", personal_steps, "must be > 0")
    require(personal_lr is None or personal_lr > 0, "personal_lr", personal_lr, "must be > 0")
    return Ditto(train.local_steps, train.beta, float(lam),
                 train.local_steps if personal_steps is None else int(personal_steps),
                 train.beta if personal_lr is None else float(personal_lr))

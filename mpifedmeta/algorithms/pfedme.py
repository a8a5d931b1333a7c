"""pFedMe (Dinh et al., NeurIPS 2020, Alg. 1): personalization by a Moreau envelope.

At the round's start θ ← w and w_i ← w; for t = 1..τ: K times θ ← θ − η_p·(∇f_i(θ; D_t) + λ·(θ − w_i)),
then w_i ← w_i − β·λ·(w_i − θ). Upload w_i. Personalized model: K full-batch steps of the θ-update
from θ = w with anchor w. pFedMe's server mixing β_s is ``server.lr`` with the sgd server optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from mpifedmeta.algorithms.base import Algorithm, Train, batch, prox_step, require, round_batches


@dataclass(frozen=True)
class PFedMe(Algorithm):
    tau: int
    beta: float
    lam: float
    inner_steps: int
    inner_lr: float
    name = "pfedme"
    personalized = True

    @property
    def models_at_once(self) -> int:
        return 4

    def local_update(self, backend, theta, state, w, X, Y, idx, mask):
        steps = round_batches(X, Y, idx, mask)
        local = backend.layout.views(theta)                 # w_i, updated in place: the upload
        personal = [p.clone() for p in local]               # θ
        losses = []
        for t in range(self.tau):
            x, y, m = batch(steps(t), 0)
            for k in range(self.inner_steps):
                value = prox_step(backend, personal, local, self.lam, self.inner_lr, x, y, m)
                if k == 0:
                    losses.append(value)
            # w_i ← w_i − βλ(w_i − θ) = (1 − βλ)·w_i + βλ·θ
            torch._foreach_lerp_(local, personal, self.beta * self.lam)
        return theta, torch.stack(losses, dim=1), None

    def personalize(self, backend, w, state, has, x, y, mask):
        n = x.shape[0]
        flat = w.expand(n, w.shape[-1]).clone()
        theta, anchor = backend.layout.views(flat), backend.layout.views(w.expand(n, w.shape[-1]))
        for _ in range(self.inner_steps):
            prox_step(backend, theta, anchor, self.lam, self.inner_lr, x, y, mask)
        return flat


def build(train: Train,
          lam: Annotated[float, "λ: weight of the proximal term tying θ to the local model"] = 15.0,
          inner_steps: Annotated[int, "K: steps solving the personalized problem per local step"] = 5,
          inner_lr: Annotated[float, "η_p: step size of those K steps"] = 0.01) -> PFedMe:
    require(lam > 0, "lam", lam, "must be > 0")
    require(inner_steps > 0, "inner_steps", inner_steps, "must be > 0")
    require(inner_lr > 0, "inner_lr", inner_lr, "must be > 0")
    return PFedMe(train.local_steps, train.beta, float(lam), int(inner_steps), float(inner_lr))

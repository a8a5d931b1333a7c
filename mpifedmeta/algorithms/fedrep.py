"""FedRep (Collins et al., ICML 2021, Alg. 1): a shared representation (the body) and a head per agent.

The agent's stored head h_i (the head of the round's w at its first participation); body φ_i ← body
of w; ``head_steps`` steps h_i ← h_i − head_lr·∇_h f_i(φ_i, h_i; D) with φ fixed, then τ steps
φ_i ← φ_i − β·∇_φ f_i(φ_i, h_i; D_t) with h fixed; store h_i, upload φ_i. The server averages the
body only; the global model's head stays as initialized. Personalized model: (body of w, h_i), or
for an agent without a head ``head_steps`` full-batch head steps from the head of w.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import torch

from mpifedmeta.algorithms.base import (Algorithm, Train, batch, concat, require, round_batches, sgd_step,
                                        state_views)
from mpifedmeta.errors import ConfigError


def last_layer(model: torch.nn.Module) -> tuple[str, ...]:
    """The names of the parameters of the model's last module that holds parameters of its own."""
    last = ()
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            last = tuple(f"{prefix}.{n}" if prefix else n for n in own)
    return last


@dataclass(frozen=True)
class FedRep(Algorithm):
    tau: int
    beta: float
    head: tuple[str, ...] | None
    head_steps: int
    head_lr: float
    head_index: tuple[int, ...] = ()        # positions of the head's parameters (prepare)
    name = "fedrep"
    personalized = True
    stateful = True

    @property
    def steps(self) -> int:
        return max(self.tau, self.head_steps)

    @property
    def slots(self) -> int:
        return 2                      # slot 0: the head steps' batches, slot 1: the body steps'

    def prepare(self, model, layout):
        names = layout.names
        if self.head is None:
            prefixes, where = last_layer(model), "the model's last layer"
        else:
            prefixes, where = self.head, f"algorithm.head = {list(self.head)!r}"
        index = tuple(i for i, n in enumerate(names) if any(n == p or n.startswith(p + ".") for p in prefixes))
        missing = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
        if missing or not index:
            raise ConfigError(f"{where}: no parameter named {missing[0] if missing else prefixes!r} or under it "
                              f"(parameters: {', '.join(names[:12])})")
        if len(index) == len(names):
            raise ConfigError(f"{where}: the head would hold every parameter (nothing left to share)")
        return dataclasses.replace(self, head=tuple(prefixes), head_index=index)

    def body_index(self, layout) -> tuple[int, ...]:
        return tuple(i for i in range(len(layout.names)) if i not in self.head_index)

    def state_params(self, layout):
        return self.head_index

    def shared_params(self, layout):
        return self.body_index(layout)

    def local_update(self, backend, theta, state, w, X, Y, idx, mask):
        steps, params = round_batches(X, Y, idx, mask), backend.layout.views(theta)
        head, body = self.head_index, self.body_index(backend.layout)
        for p, h in zip([params[i] for i in head], state_views(state, backend.layout, head)):
            p.copy_(h)
        for t in range(self.head_steps):
            sgd_step(backend, params, self.head_lr, *batch(steps(t), 0), only=head)
        losses = [sgd_step(backend, params, self.beta, *batch(steps(t), 1), only=body) for t in range(self.tau)]
        return theta, torch.stack(losses, dim=1), concat(params, head)

    def personalize(self, backend, w, state, has, x, y, mask):
        n = x.shape[0]
        flat = w.expand(n, w.shape[-1]).clone()
        params = backend.layout.views(flat)
        if has is None or not bool(has.all()):
            for _ in range(self.head_steps):
                sgd_step(backend, params, self.head_lr, x, y, mask, only=self.head_index)
        if has is not None:
            stored = state_views(state, backend.layout, self.head_index)
            for p, h in zip([params[i] for i in self.head_index], stored):
                p.copy_(torch.where(has.view((-1,) + (1,) * (h.dim() - 1)), h, p))
        return flat


def build(train: Train,
          head: Annotated[list | None, "parameter-name prefixes of the personal head (default: the model's last layer)"] = None,
          head_steps: Annotated[int | None, "head steps per round (default: train.local_steps)"] = None,
          head_lr: Annotated[float | None, "step size of the head steps (default: train.beta)"] = None) -> FedRep:
    require(head is None or (len(head) > 0 and all(isinstance(p, str) and p for p in head)), "head", head,
            "must be a non-empty list of parameter-name prefixes")
    require(head_steps is None or head_steps >= 0, "head_steps", head_steps, "must be >= 0")
    require(head_lr is None or head_lr > 0, "head_lr", head_lr, "must be > 0")
    return FedRep(train.local_steps, train.beta, None if head is None else tuple(head),
                  train.local_steps if head_steps is None else int(head_steps),
                  train.beta if head_lr is None else float(head_lr))

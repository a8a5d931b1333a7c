"""The ν-step meta federated learning family (Per-FedAvg generalized; ν = 0 is FedAvg).

τ local meta-steps w_i ← w_i − β·∇̃F_i(w_i) with the ν-step meta-gradient of core/metagrad.py
(``exact`` / ``fo`` / ``hf``); its keys are ``train.nu``, ``train.alpha``, ``train.metagrad``,
``train.hf_delta`` and ``train.recompute``. Personalization is the evaluation's k fine-tuning steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpifedmeta.algorithms.base import Algorithm, Train
from mpifedmeta.core import metagrad


@dataclass(frozen=True)
class Meta(Algorithm):
    meta: metagrad.MetaSpec
    beta: float
    tau: int
    name = "meta"

    @property
    def slots(self) -> int:
        return metagrad.num_slots(self.meta.nu, self.meta.method)

    @property
    def models_at_once(self) -> int:
        return 3 if (self.meta.recompute or self.meta.method == "fo") else self.meta.nu + 2

    def local_update(self, backend, theta, state, w, X, Y, idx, mask):
        theta, losses = metagrad.local_update(backend, theta, X, Y, idx, mask, self.meta, self.beta)
        return theta, losses, None


def build(train: Train) -> Meta:
    """The ν-family from ``[train]`` (no keys of its own)."""
    return Meta(metagrad.MetaSpec(train.nu, train.alpha, train.metagrad, train.hf_delta, train.recompute),
                train.beta, train.local_steps)

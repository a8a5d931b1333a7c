"""One run's results as read from its metrics.h5 by :func:`mpifedmeta.storage.metrics.read` (plain arrays)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunMetrics:
    """What one run's ``metrics.h5`` holds, as :func:`mpifedmeta.storage.metrics.read` returns it.

    ``R`` evaluation rows, ``K`` fine-tuning step counts, ``A`` evaluated training agents, ``H``
    holdout agents (possibly 0). Per-agent arrays are kept for the last evaluation row only (the
    full ``(R, K, A)`` arrays can be large; ``metrics.read(..., tables=True)`` reads everything).
    """

    out_dir: str
    path: str
    config: dict
    finetune_steps: np.ndarray  # (K,) int64
    eval_round: np.ndarray  # (R,) int64
    train_loss_mean: np.ndarray  # (R, K) float64
    train_acc_mean: np.ndarray  # (R, K)
    holdout_loss_mean: np.ndarray  # (R, K), NaN when H == 0
    holdout_acc_mean: np.ndarray  # (R, K)
    final_train_agent_loss: np.ndarray  # (K, A) at eval_round[-1]; (K, 0) when R == 0
    final_train_agent_acc: np.ndarray  # (K, A)
    final_holdout_agent_loss: np.ndarray  # (K, H)
    final_holdout_agent_acc: np.ndarray  # (K, H)
    train_agent_ids: np.ndarray  # (A,) int64
    holdout_agent_ids: np.ndarray  # (H,) int64
    train: dict[str, np.ndarray]  # 1-D arrays of the `train` group: round, train_loss, wall_time, ...
    attrs: dict[str, Any] = field(default_factory=dict)  # other file attributes (strategy, versions, ...)
    grad_norm_sq: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) ‖∇F(w)‖², NaN when not tracked
    meta_loss_full: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (R,) F(w) on full local data
    tables: dict | None = None  # with metrics.read(..., tables=True): {"train"|"eval": {dataset: full array}}
    # algorithms with a personalized model: {"personal_acc_mean": (R,), "holdout_personal_loss_mean": (R,), ...,
    # "final_personal_agent_acc": (A,), ...}; empty otherwise
    personal: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_personal(self) -> bool:
        return "personal_acc_mean" in self.personal

    @property
    def name(self) -> str:
        """The output directory's name."""
        return os.path.basename(os.path.normpath(self.out_dir)) or self.out_dir

    @property
    def num_holdout(self) -> int:
        return int(self.final_holdout_agent_acc.shape[1])

    @property
    def has_holdout(self) -> bool:
        return self.num_holdout > 0 or bool(np.isfinite(self.holdout_acc_mean).any())

    @property
    def final_eval_round(self) -> int | None:
        return int(self.eval_round[-1]) if self.eval_round.size else None

    @property
    def rounds(self) -> int:
        """Last completed training round (0 if none)."""
        r = self.train.get("round")
        if r is not None and r.size:
            return int(r[-1])
        return int(self.eval_round.max()) if self.eval_round.size else 0

    @property
    def wall_time(self) -> float:
        """Training wall time in seconds at the last completed round (NaN if none)."""
        w = self.train.get("wall_time")
        return float(w[-1]) if w is not None and w.size else float("nan")

    def k_index(self, k: int) -> int | None:
        hits = np.flatnonzero(self.finetune_steps == k)
        return int(hits[0]) if hits.size else None

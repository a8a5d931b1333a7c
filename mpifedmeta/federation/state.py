"""Per-agent state of a stateful algorithm (Ditto's personal models, FedRep's heads): arrays indexed
by agent id, held by the rank whose resident block computes the agent.

``values`` (n, size) on the device and ``has`` (n,) bool for the block's agents [lo, hi); a first-time
agent's row is its algorithm's initial value (taken from the round's global model). A checkpoint
holds the whole population's arrays (gathered on rank 0, :func:`gather`), so a resume may use any
number of ranks: each rank then reads its own rows (:meth:`AgentState.load`).
"""

from __future__ import annotations

import numpy as np
import torch

from mpifedmeta.parallel import dist


class AgentState:
    def __init__(self, lo: int, hi: int, size: int, device: torch.device, dtype: torch.dtype):
        self.lo, self.hi = lo, hi
        self.values = torch.zeros(hi - lo, size, dtype=dtype, device=device)
        self.has = torch.zeros(hi - lo, dtype=torch.bool, device=device)

    def rows(self, positions: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The stored rows of the agents at ``positions`` (a copy), ``initial`` (size,) for those without."""
        return torch.where(self.has[positions].unsqueeze(1), self.values[positions], initial)

    def store(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        self.values[positions] = rows.to(self.values.dtype)
        self.has[positions] = True

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.values.cpu().numpy(), self.has.cpu().numpy().astype(np.uint8)

    def load(self, values: np.ndarray, has: np.ndarray) -> None:
        """This block's rows [lo, hi) of a whole population's arrays (or exactly those rows)."""
        if values.shape[0] != self.hi - self.lo:
            values, has = values[self.lo:self.hi], has[self.lo:self.hi]
        self.values.copy_(torch.as_tensor(np.ascontiguousarray(values)))
        self.has.copy_(torch.as_tensor(np.asarray(has, dtype=bool)))


def gather(world: dist.World, state: AgentState) -> tuple[np.ndarray, np.ndarray] | None:
    """The whole population's (values, has) on rank 0 (blocks are contiguous, in rank order); None elsewhere."""
    values, has = state.arrays()
    all_values = dist.gather_rows(world, values)
    all_has = dist.gather_rows(world, has)
    return None if all_values is None else (all_values, all_has)

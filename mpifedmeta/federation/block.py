"""A block of agents and only their samples, on the rank's device.

A rank's block is either the contiguous ids [lo, hi) it owns (stored partitions) or, for generated
populations, any sorted set of agent ids (``agent_ids``) built for one round or one evaluation chunk.
Agent state is arrays indexed by local agent position (no per-agent Python objects): a block's
training samples are one tensor, agent a's rows are ``offset[a] : offset[a] + count[a]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Padded widths are multiples of this many rows, so that every agent's slice of a (width, h) float32
#: activation starts on a 64-byte boundary. MKL's batched kernels (under the vmap backend) round by the
#: alignment of the agents' slices: without it one agent's bits depended on its block's size, i.e. on
#: the number of ranks (1 ulp in one agent's evaluation loss, the quickstart on 2 vs 4 ranks).
ALIGN_ROWS = 16


def aligned_width(rows: int) -> int:
    """The padding width for splits of at most ``rows`` samples: rounded up to ALIGN_ROWS."""
    return -(-max(int(rows), 1) // ALIGN_ROWS) * ALIGN_ROWS


@dataclass
class AgentBlock:
    lo: int
    hi: int
    X_train: torch.Tensor
    Y_train: torch.Tensor
    train_offset: torch.Tensor   # (n_agents,) int64, on the device
    train_count: torch.Tensor
    X_test: torch.Tensor
    Y_test: torch.Tensor
    test_offset: torch.Tensor
    test_count: torch.Tensor
    train_width: int             # padding width: the same on every rank (see padded_rows)
    test_width: int
    agent_ids: np.ndarray | None = None   # sorted global ids of the positions; None = lo..hi-1

    def global_ids(self) -> np.ndarray:
        """The block's global agent ids, by position."""
        return np.arange(self.lo, self.hi, dtype=np.int64) if self.agent_ids is None else self.agent_ids

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of ``ids`` the block holds (bool mask) and their positions in the block (int64)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.agent_ids is None:
            mine = (ids >= self.lo) & (ids < self.hi)
            return mine, ids[mine] - self.lo
        pos = np.searchsorted(self.agent_ids, ids)
        mine = pos < len(self.agent_ids)
        mine[mine] = self.agent_ids[pos[mine]] == ids[mine]
        return mine, pos[mine].astype(np.int64)

    @property
    def num_agents(self) -> int:
        return self.hi - self.lo

    @property
    def device(self) -> torch.device:
        return self.X_train.device


def _rows(ptr: np.ndarray, idx: np.ndarray, lo: int, hi: int):
    start, stop = int(ptr[lo]), int(ptr[hi])
    offsets = (ptr[lo:hi] - start).astype(np.int64)
    counts = np.diff(ptr[lo:hi + 1]).astype(np.int64)
    return idx[start:stop], offsets, counts


def build_block(x: np.ndarray, y: np.ndarray, partition, lo: int, hi: int, device: torch.device,
                dtype: torch.dtype) -> AgentBlock:
    """Copy the samples of agents [lo, hi) to ``device`` (the rest of the data is never moved there)."""
    tr_idx, tr_off, tr_cnt = _rows(partition.train_ptr, partition.train_idx, lo, hi)
    te_idx, te_off, te_cnt = _rows(partition.test_ptr, partition.test_idx, lo, hi)

    def put(a, dt=None):
        return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    return AgentBlock(lo, hi,
                      put(x[tr_idx], dtype), put(y[tr_idx], torch.int64), put(tr_off), put(tr_cnt),
                      put(x[te_idx], dtype), put(y[te_idx], torch.int64), put(te_off), put(te_cnt),
                      aligned_width(np.diff(partition.train_ptr).max()), aligned_width(np.diff(partition.test_ptr).max()))


def assemble(agent_ids: np.ndarray, x_train: np.ndarray, y_train: np.ndarray, train_count: np.ndarray,
             x_test: np.ndarray, y_test: np.ndarray, test_count: np.ndarray, train_width: int, test_width: int,
             device: torch.device, dtype: torch.dtype) -> AgentBlock:
    """A block of the sorted ``agent_ids`` from their concatenated samples (each agent's rows contiguous)."""
    def put(a, dt=None):
        return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    def offsets(c):
        return np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) if len(c) else np.zeros(0, np.int64)

    agent_ids = np.asarray(agent_ids, dtype=np.int64)
    return AgentBlock(0, len(agent_ids),
                      put(x_train, dtype), put(y_train, torch.int64), put(offsets(train_count)),
                      put(np.asarray(train_count, np.int64)),
                      put(x_test, dtype), put(y_test, torch.int64), put(offsets(test_count)),
                      put(np.asarray(test_count, np.int64)), int(train_width), int(test_width), agent_ids)


def padded_rows(offset: torch.Tensor, count: torch.Tensor, positions: torch.Tensor,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each selected agent's rows padded to ``width``: (B, width) indices and a 0/1 mask.

    Padding points at the agent's first row and has mask 0, so it never changes a masked mean.
    ``width`` must not depend on which agents a rank holds (use the largest split of any agent):
    the rounding of the masked sums depends on the padded length, and results must be the same
    for any number of ranks.
    """
    cnt = count[positions]
    ar = torch.arange(width, device=offset.device)
    mask = ar.unsqueeze(0) < cnt.unsqueeze(1)
    idx = offset[positions].unsqueeze(1) + torch.where(mask, ar.unsqueeze(0), torch.zeros_like(ar).unsqueeze(0))
    return idx, mask

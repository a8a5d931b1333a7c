"""Fixed-shape agent chunks (``train.agent_chunk``).

A rank's batched calls (local round, evaluation, stationarity) would otherwise see B = the
rank's agents, a number that changes with the number of ranks. GPU libraries choose kernels
(cuBLAS batched GEMM, split-K, cuDNN grouped convolutions) partly by that batch count, so one
agent's bits could depend on P. With a chunk size C every call sees exactly C agents: the last
chunk is padded with dummy agents (copies of the chunk's first agent with mask 0) whose results
are dropped, so they never reach a sum.
"""

from __future__ import annotations

import torch


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of the chunks of ``n`` items; ``size`` 0 = one span of everything (no chunking)."""
    if n <= 0:
        return []
    if size <= 0:
        return [(0, n)]
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def pad(t: torch.Tensor, size: int, fill: float | None = None) -> torch.Tensor:
    """``t`` with dim 0 padded up to ``size`` rows: copies of row 0 (valid indices), or ``fill``.

    Broadcast dimensions (stride 0, e.g. the same full batch in every local step) stay broadcast,
    so the engine still sees them as "the same rows every step"."""
    missing = size - t.shape[0]
    if missing <= 0:
        return t
    shape = tuple(t.shape)
    base = t
    for d in range(1, t.dim()):
        if t.stride(d) == 0 and shape[d] > 1:
            base = base.narrow(d, 0, 1)
    rest = tuple(base.shape[1:])
    if fill is None:
        extra = base[:1].expand((missing,) + rest)
    else:
        extra = torch.full((missing,) + rest, fill, dtype=t.dtype, device=t.device)
    return torch.cat([base, extra]).expand((size,) + shape[1:])


def pad_to_multiple(t: torch.Tensor, size: int, fill: float | None = None) -> torch.Tensor:
    """``t`` padded along dim 0 to a multiple of ``size`` (unchanged when ``size`` is 0)."""
    if size <= 0 or t.shape[0] % size == 0:
        return t
    return pad(t, t.shape[0] + size - t.shape[0] % size, fill)

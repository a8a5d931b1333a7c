"""Agent chunks: how every batched call over a rank's agents is cut (``train.agent_chunk``).

The local round, the evaluation, the stationarity diagnostic and the strategy timing all run
their agents through :func:`each` — one definition of "chunk": at most ``size`` agents per call,
on CUDA each call padded to exactly ``size`` agents, so that kernel shapes never depend on
the number of ranks (:func:`fixed_shapes`). GPU libraries choose kernels (cuBLAS batched GEMM, split-K, cuDNN
grouped convolutions) partly by the batch count, so one agent's bits could otherwise depend on P.
Padding agents are copies of the chunk's first agent with mask 0; their results are never used.
On the CPU a chunk also keeps the block's models cache-sized (strategy.py picks the size).
"""

from __future__ import annotations

from typing import Iterator

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


def each(n: int, size: int, indices: tuple[torch.Tensor, ...] = (), masks: tuple[torch.Tensor, ...] = (),
         fixed: bool = True) -> Iterator[tuple[int, int, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """For each chunk of the ``n`` agents: (start, stop, the index tensors' rows, the masks' rows),
    padded to exactly ``size`` rows when ``fixed`` (indices with copies of the first row, masks
    with 0). ``size`` 0: one chunk of every agent, unpadded."""
    for a, b in spans(n, size):
        i = tuple(t[a:b] for t in indices)
        m = tuple(t[a:b] for t in masks)
        if fixed and size > 0:
            i = tuple(pad(t, size) for t in i)
            m = tuple(pad(t, size, 0.0) for t in m)
        yield a, b, i, m


def fixed_shapes(device: torch.device) -> bool:
    """Whether chunks are padded to exactly their size: on CUDA (kernel choice depends on the batch
    count); not on the CPU, where an agent's bits do not depend on its block's size and padding
    would only add work."""
    return device.type == "cuda"


def broadcast(w: torch.Tensor, rows: int) -> torch.Tensor:
    """The flat global model (d,) copied into a (rows, d) tensor of the chunk's own local models."""
    return w.expand(rows, w.shape[-1]).clone()

"""The local loss f_i of the meta-objective: each agent's masked mean cross-entropy.

Masks weight each sample (1 = real, 0 = padding when agents with different sample counts are
batched together), so that padding never changes an agent's loss or gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ClassesFirst(torch.autograd.Function):
    """(B, b, C) → a contiguous (B, C, b), whose gradient comes back contiguous in (B, b, C): a
    transposed logits gradient made the last layer's bias gradient (a sum over the samples)
    depend on the number of agents in the block in the last bits."""

    @staticmethod
    def forward(x):
        return x.movedim(-1, 1).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return _ClassesLast.apply(g)


class _ClassesLast(torch.autograd.Function):
    """The inverse of :class:`_ClassesFirst` (its gradient, and so on for double backward)."""

    @staticmethod
    def forward(x):
        return x.movedim(1, -1).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return _ClassesFirst.apply(g)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of (..., C) logits and (...) labels.

    Batched logits (B, b, C) go in torch's (N, C, d) form, classes on dim 1: measured 2.4x faster
    (forward and backward) than flattening to (B·b, C) for 10 classes, whose last-dim softmax
    kernel vectorises poorly over so few classes."""
    if logits.dim() >= 3:
        return F.cross_entropy(_ClassesFirst.apply(logits), y, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def masked_mean_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., b, C) logits, (..., b) labels and weights → (...) each agent's masked mean cross-entropy."""
    return (cross_entropy(logits, y) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)

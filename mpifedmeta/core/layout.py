"""A model's parameters as ONE flat vector per agent.

The engine keeps a block's local models in one (B, d) tensor: the exact sum reads them where
they lie, and a chunk's models start as one broadcast copy of the global model. Inside the
recursion a model is the list of its parameter tensors (:meth:`ParamLayout.views` of the flat
tensor, or fresh tensors for fine-tuned iterates), in ``named_parameters()`` order, so that
autograd's per-parameter gradients are used as they come — no cat into a flat gradient (measured:
autograd's split backward cost 0.6 ms per gradient on a (32, 10670) block, more than the update)
— and every update is one multi-tensor ``torch._foreach_*`` call (a single fused kernel on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and sizes of a model's parameters, in ``named_parameters()`` order."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: dict[str, torch.Tensor]) -> "ParamLayout":
        return cls(tuple(params), tuple(tuple(v.shape) for v in params.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (d,) or (B, d) as {name: (*shape)} or {name: (B, *shape)}."""
        lead = flat.shape[:-1]
        parts = flat.split(self.sizes, dim=-1)
        return {n: p.view(lead + s) for n, p, s in zip(self.names, parts, self.shapes)}

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (B, d) as the list of (B, *shape) parameters (writes go to ``flat``)."""
        lead = flat.shape[:-1]
        return [p.view(lead + s) for p, s in zip(flat.split(self.sizes, dim=-1), self.shapes)]

    def flatten(self, params: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """The inverse of :meth:`split` (a copy): {name: (*lead, *shape)} → (*lead, d)."""
        first = params[self.names[0]]
        lead = tuple(first.shape[:batch_dims])
        return torch.cat([params[n].reshape(lead + (-1,)) for n in self.names], dim=-1)

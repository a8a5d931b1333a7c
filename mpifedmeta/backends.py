"""How a block's per-agent gradients and Hessian-vector products are computed (``train.strategy``).

Every backend works on stacked parameters (B, ...) and gathered batches x (B, b, ...), y (B, b),
mask (B, b) and supplies three functions; the ν-step recursion (metagrad.meta_gradients) is
written once on top of them:

    grad(params, x, y, mask)    -> (every agent's ∇f_i {name: (B, ...)}, the losses f_i (B,))
    hvp(params, v, x, y, mask)  -> every agent's ∇²f_i(θ_i) v_i {name: (B, ...)}
    logits(params, x)           -> (B, b, classes)

f_i is agent i's masked mean cross-entropy.

- ``stacked``: the block as ONE model whose parameters carry the agent axis, derived from the
  model's structure (mpifedmeta/lift.py; any model it can lift). The sum of the agents' losses is separable, so
  one autograd.grad gives every agent's gradient and a double backward with the stacked vectors
  v_i gives every H_i v_i: a handful of batched kernels per layer, no torch.func transform.
- ``vmap``: torch.func vmap of grad / vjp-of-grad of the per-agent functional loss; any model.
- ``chunked``: vmap over chunks of ``chunk`` agents (bounded memory).
- ``loop``: one agent at a time with plain torch.autograd (what per-agent simulators do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vjp, vmap

from . import metagrad
from .lift import lift


def masked_mean_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, b, C) logits, (B, b) labels and weights → (B,) each agent's masked mean cross-entropy."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _leaves(params: dict) -> tuple[list[str], list[torch.Tensor]]:
    names = list(params)
    return names, [params[k].detach().requires_grad_(True) for k in names]


def _dense(names, grads, like):
    return {k: (g if g is not None else torch.zeros_like(p)) for k, g, p in zip(names, grads, like)}


def _double_backward(f, names, leaves, vs):
    """{name: H v} by differentiating ∇f against v (a parameter the loss never reads gets 0).

    v is made contiguous: v is usually a gradient, which autograd may return transposed (a
    bmm's weight gradient), and with such a v an agent's H v in a block was measured to depend on
    the other agents' v in the last bits (so a run would depend on the number of ranks)."""
    g = torch.autograd.grad(f, leaves, create_graph=True, allow_unused=True)
    used = [i for i, t in enumerate(g) if t is not None]
    hv = torch.autograd.grad([g[i] for i in used], leaves, grad_outputs=[vs[i].contiguous() for i in used],
                             allow_unused=True)
    return _dense(names, hv, leaves)


class Stacked:
    """The whole block in one autograd graph (see the module docstring).

    Tried and not kept: a hand-derived backward of the dense layers (δ = (softmax − onehot)·mask/n,
    ∂W = δᵀh by bmm, no autograd graph) measured 0.92–1.12× the time of autograd on the digits MLP
    (32 agents, τ = 5, ν ∈ {0, 1 fo, 3 exact}, 1 thread, two interleaved runs at load 6–7): no
    clear gain for a second implementation of the gradient. The matrix products dominate.
    """
    name = "stacked"

    def __init__(self, forward):
        self.forward = forward

    def logits(self, params, x):
        return self.forward(params, x)

    def grad(self, params, x, y, mask):
        names, leaves = _leaves(params)
        with torch.enable_grad():
            f = masked_mean_ce(self.forward(dict(zip(names, leaves)), x), y, mask)
            g = torch.autograd.grad(f.sum(), leaves, allow_unused=True)    # a parameter forward never reads: 0
        return _dense(names, g, leaves), f.detach()

    def hvp(self, params, v, x, y, mask):
        names, leaves = _leaves(params)
        with torch.enable_grad():
            f = masked_mean_ce(self.forward(dict(zip(names, leaves)), x), y, mask)
            return _double_backward(f.sum(), names, leaves, [v[k] for k in names])

    def traceable(self):
        """The same block model differentiated with torch.func (grad, vjp of grad) instead of
        torch.autograd: what torch.compile traces correctly (measured: it miscompiles the
        create_graph double backward of the autograd form)."""
        return StackedFunc(self.forward)


class StackedFunc(Stacked):
    """:class:`Stacked` with torch.func transforms (for torch.compile; slower eagerly)."""

    def __init__(self, forward):
        super().__init__(forward)
        self._total = lambda p, x, y, m: masked_mean_ce(forward(p, x), y, m).sum()
        self._losses = lambda p, x, y, m: masked_mean_ce(forward(p, x), y, m)

    def grad(self, params, x, y, mask):
        g = grad(self._total)(params, x, y, mask)
        return g, self._losses(params, x, y, mask).detach()

    def hvp(self, params, v, x, y, mask):
        return vjp(lambda p: grad(self._total)(p, x, y, mask), params)[1](v)[0]

    def traceable(self):
        return self


class Vmap:
    """torch.func: vmap over agents of the per-agent functional loss (any model)."""
    name = "vmap"

    def __init__(self, model: torch.nn.Module):
        loss = metagrad.make_loss(model)
        self._grad = vmap(grad_and_value(loss))
        self._hvp = vmap(lambda p, v, x, y, m: metagrad.hvp_exact(loss, p, v, x, y, m))
        self._logits = vmap(metagrad.make_logits(model))

    def logits(self, params, x):
        return self._logits(params, x)

    def grad(self, params, x, y, mask):
        return self._grad(params, x, y, mask)

    def hvp(self, params, v, x, y, mask):
        return self._hvp(params, v, x, y, mask)

    def traceable(self):
        return self


class Chunked(Vmap):
    """:class:`Vmap` over chunks of ``chunk`` agents: memory bounded by the chunk, not the block."""
    name = "chunked"

    def __init__(self, model: torch.nn.Module, chunk: int):
        super().__init__(model)
        self.chunk = chunk

    def _chunks(self, fn, *args):
        B = args[-1].shape[0]
        if B <= self.chunk:
            return fn(*args)
        cut = lambda a, s: {k: t[s:s + self.chunk] for k, t in a.items()} if isinstance(a, dict) else a[s:s + self.chunk]
        parts = [fn(*(cut(a, s) for a in args)) for s in range(0, B, self.chunk)]
        cat = lambda ps: {k: torch.cat([p[k] for p in ps]) for k in ps[0]} if isinstance(ps[0], dict) else torch.cat(ps)
        return tuple(cat(list(p)) for p in zip(*parts)) if isinstance(parts[0], tuple) else cat(parts)

    def logits(self, params, x):
        return self._chunks(super().logits, params, x)

    def grad(self, params, x, y, mask):
        return self._chunks(super().grad, params, x, y, mask)

    def hvp(self, params, v, x, y, mask):
        return self._chunks(super().hvp, params, v, x, y, mask)


class Loop:
    """One agent at a time with plain torch.autograd on the model applied functionally."""
    name = "loop"

    def __init__(self, model: torch.nn.Module):
        self.loss = metagrad.make_loss(model)
        self._logits = metagrad.make_logits(model)

    def logits(self, params, x):
        return torch.stack([self._logits({k: p[a] for k, p in params.items()}, x[a]) for a in range(x.shape[0])])

    def _each(self, params, x, y, mask, fn):
        out = None
        for a in range(x.shape[0]):
            names, leaves = _leaves({k: p[a] for k, p in params.items()})
            with torch.enable_grad():
                f = self.loss(dict(zip(names, leaves)), x[a], y[a], mask[a])
                res = fn(a, names, leaves, f)
            if out is None:
                out = {k: torch.empty((x.shape[0],) + r.shape, dtype=r.dtype, device=r.device) for k, r in res.items()}
            for k, r in res.items():
                out[k][a] = r
        return out

    def grad(self, params, x, y, mask):
        values = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)

        def one(a, names, leaves, f):
            values[a] = f.detach()
            return _dense(names, torch.autograd.grad(f, leaves, allow_unused=True), leaves)

        return self._each(params, x, y, mask, one), values

    def hvp(self, params, v, x, y, mask):
        def one(a, names, leaves, f):
            return _double_backward(f, names, leaves, [v[k][a] for k in names])

        return self._each(params, x, y, mask, one)


def has_stacked_form(model: torch.nn.Module) -> bool:
    return lift(model).forward is not None


def default_strategy(model: torch.nn.Module) -> str:
    """``stacked`` wherever the model's stacked form can be derived, else ``vmap``."""
    return "stacked" if has_stacked_form(model) else "vmap"


def resolve(strategy: str, model: torch.nn.Module) -> tuple[str, str]:
    """(the strategy that runs, how the start-up line names it) for an explicit ``train.strategy``:
    ``stacked`` for a model without a derivable stacked form runs ``vmap`` and says why."""
    if strategy == "stacked":
        reason = lift(model).reason
        if reason is not None:
            return "vmap", f"vmap (stacked form not derivable: {reason})"
    return strategy, strategy


def make(model: torch.nn.Module, strategy: str, chunk: int = 64):
    """The backend ``strategy`` (one of metagrad.STRATEGIES) for ``model``."""
    if strategy == "stacked":
        lifted = lift(model)
        if lifted.forward is None:
            raise ValueError(f"train.strategy = 'stacked': no stacked form of {type(model).__name__} "
                             f"({lifted.reason}); use vmap, chunked or loop")
        return Stacked(lifted.forward)
    if strategy == "vmap":
        return Vmap(model)
    if strategy == "chunked":
        return Chunked(model, chunk)
    if strategy == "loop":
        return Loop(model)
    raise ValueError(f"strategy must be one of {metagrad.STRATEGIES}, got {strategy!r}")

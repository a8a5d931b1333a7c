"""How a block's per-agent gradients and Hessian-vector products are computed (``train.strategy``).

Every backend works on a block's models as the list θ of its stacked parameters, (B, *shape)
each in ``named_parameters()`` order (see layout.py), and gathered batches x (B, b, ...),
y (B, b), mask (B, b), and supplies three functions; the ν-step recursion
(metagrad.meta_gradients) is written once on top of them:

    grad(theta, x, y, mask)     -> (every agent's ∇f_i as such a list, the losses f_i (B,))
    hvp(theta, v, x, y, mask)   -> every agent's ∇²f_i(θ_i) v_i as such a list
    logits(theta, x)            -> (B, b, classes)

f_i is agent i's masked mean cross-entropy. The returned tensors are fresh: the caller may
update them in place. Every backend has ``layout`` (layout.ParamLayout).

- ``stacked``: the block as ONE model whose parameters carry the agent axis, derived from the
  model's structure (lift.py: any model it can lift). The sum of the agents' losses is separable, so one autograd.grad
  gives every agent's gradient and a double backward with the stacked vectors v_i gives every
  H_i v_i: a handful of batched kernels per layer, no torch.func transform.
- ``vmap``: torch.func vmap of grad / vjp-of-grad of the per-agent functional loss; any model.
- ``chunked``: vmap over chunks of ``chunk`` agents (bounded memory).
- ``loop``: one agent at a time on one resident ``nn.Module`` whose parameters are loaded with
  each agent's weights, plain torch.autograd (what per-agent simulators do; the fastest form where
  per-agent kernels are already large, e.g. convolutions on the CPU).
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

from mpifedmeta.core.layout import ParamLayout
from mpifedmeta.core.losses import masked_mean_ce
from mpifedmeta.models.lift import lift


def _leaves(theta: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(True) for t in theta]


def _or_zeros(grads, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """A parameter the loss never reads gets a zero gradient. Every result is a tensor of its own:
    autograd hands two parameters added together (``self.a + self.b``) the same gradient tensor,
    and the caller updates the results in place."""
    out, seen = [], set()
    for g, p in zip(grads, like):
        if g is None:
            g = torch.zeros_like(p)
        elif g.untyped_storage().data_ptr() in seen or 0 in g.stride():
            g = g.clone()
        seen.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


def _double_backward(f, leaves, v) -> list[torch.Tensor]:
    """H v by differentiating ∇f against v.

    v is made contiguous: v is usually a gradient, which autograd may return transposed (a bmm's
    weight gradient), and with such a v an agent's H v in a block was measured to depend on the
    other agents' v in the last bits (so a run would depend on the number of ranks)."""
    g = torch.autograd.grad(f, leaves, create_graph=True, allow_unused=True)
    used = [i for i, t in enumerate(g) if t is not None]
    hv = torch.autograd.grad([g[i] for i in used], leaves, grad_outputs=[v[i].contiguous() for i in used],
                             allow_unused=True)
    return _or_zeros(hv, leaves)


class Stacked:
    """The whole block in one autograd graph (see the module docstring).

    Tried and not kept: a hand-derived backward of the dense layers (δ = (softmax − onehot)·mask/n,
    ∂W = δᵀh by bmm, no autograd graph) measured 0.92–1.12× the time of autograd on the digits MLP
    (32 agents, τ = 5, ν ∈ {0, 1 fo, 3 exact}, 1 thread): no clear gain for a second
    implementation of the gradient.
    """
    name = "stacked"

    def __init__(self, forward, layout: ParamLayout):
        self.forward, self.layout = forward, layout

    def _losses(self, leaves, x, y, mask):
        return masked_mean_ce(self.forward(dict(zip(self.layout.names, leaves)), x), y, mask)

    def logits(self, theta, x):
        return self.forward(dict(zip(self.layout.names, theta)), x)

    def grad(self, theta, x, y, mask):
        leaves = _leaves(theta)
        with torch.enable_grad():
            f = self._losses(leaves, x, y, mask)
            g = torch.autograd.grad(f.sum(), leaves, allow_unused=True)
        return _or_zeros(g, leaves), f.detach()

    def hvp(self, theta, v, x, y, mask):
        leaves = _leaves(theta)
        with torch.enable_grad():
            return _double_backward(self._losses(leaves, x, y, mask).sum(), leaves, v)

    def traceable(self):
        """The same block model differentiated with torch.func (grad, vjp of grad) instead of
        torch.autograd: what torch.compile traces correctly (measured: it miscompiles the
        create_graph double backward of the autograd form)."""
        return StackedFunc(self.forward, self.layout)


class StackedFunc(Stacked):
    """:class:`Stacked` with torch.func transforms (for torch.compile; slower eagerly)."""

    def __init__(self, forward, layout: ParamLayout):
        super().__init__(forward, layout)
        self._total = lambda t, x, y, m: self._losses(t, x, y, m).sum()

    def grad(self, theta, x, y, mask):
        return list(grad(self._total)(list(theta), x, y, mask)), self._losses(theta, x, y, mask).detach()

    def hvp(self, theta, v, x, y, mask):
        return list(vjp(lambda t: grad(self._total)(t, x, y, mask), list(theta))[1](list(v))[0])

    def traceable(self):
        return self


def agent_loss(model: torch.nn.Module, layout: ParamLayout):
    """f(θ, x, y, mask): one agent's masked mean cross-entropy of ``model`` at θ (a list of tensors)."""
    def loss(theta, x, y, mask):
        return masked_mean_ce(functional_call(model, dict(zip(layout.names, theta)), (x,)), y, mask)
    return loss


class Vmap:
    """torch.func: vmap over agents of the per-agent functional loss (any model)."""
    name = "vmap"

    def __init__(self, model: torch.nn.Module, layout: ParamLayout):
        self.layout = layout
        loss = agent_loss(model, layout)
        self._grad = vmap(grad_and_value(loss))
        self._hvp = vmap(lambda t, v, x, y, m: vjp(lambda p: grad(loss)(p, x, y, m), t)[1](v)[0])
        self._logits = vmap(lambda t, x: functional_call(model, dict(zip(layout.names, t)), (x,)))

    def logits(self, theta, x):
        return self._logits(list(theta), x)

    def grad(self, theta, x, y, mask):
        g, value = self._grad(list(theta), x, y, mask)
        return list(g), value

    def hvp(self, theta, v, x, y, mask):
        return list(self._hvp(list(theta), list(v), x, y, mask))

    def traceable(self):
        return self


class Chunked(Vmap):
    """:class:`Vmap` over chunks of ``chunk`` agents: memory bounded by the chunk, not the block."""
    name = "chunked"

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, chunk: int):
        super().__init__(model, layout)
        self.chunk = chunk

    def _chunks(self, fn, *args):
        B = args[-1].shape[0]
        if B <= self.chunk:
            return fn(*args)
        cut = lambda a, s: [t[s:s + self.chunk] for t in a] if isinstance(a, list) else a[s:s + self.chunk]  # noqa: E731
        parts = [fn(*(cut(a, s) for a in args)) for s in range(0, B, self.chunk)]
        cat = lambda ps: [torch.cat(ts) for ts in zip(*ps)] if isinstance(ps[0], list) else torch.cat(ps)  # noqa: E731
        return tuple(cat(list(p)) for p in zip(*parts)) if isinstance(parts[0], tuple) else cat(parts)

    def logits(self, theta, x):
        return self._chunks(super().logits, list(theta), x)

    def grad(self, theta, x, y, mask):
        return self._chunks(super().grad, list(theta), x, y, mask)

    def hvp(self, theta, v, x, y, mask):
        return self._chunks(super().hvp, list(theta), list(v), x, y, mask)


class Loop:
    """One agent at a time on ONE resident copy of the model: its parameters are loaded with each
    agent's weights (a copy of d values) and differentiated with plain torch.autograd."""
    name = "loop"

    def __init__(self, model: torch.nn.Module, layout: ParamLayout):
        self.model = copy.deepcopy(model).requires_grad_(True)
        self.layout = layout
        self.params = [dict(self.model.named_parameters())[n] for n in layout.names]

    def _load(self, theta, a: int) -> None:
        if self.params[0].device != theta[0].device:
            self.model.to(theta[0].device)
            self.params = [dict(self.model.named_parameters())[n] for n in self.layout.names]
        with torch.no_grad():
            for p, t in zip(self.params, theta):
                p.copy_(t[a])

    def logits(self, theta, x):
        out = []
        for a in range(x.shape[0]):
            self._load(theta, a)
            with torch.no_grad():
                out.append(self.model(x[a]))
        return torch.stack(out)

    def _each(self, theta, x, y, mask, one) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for t in theta]
        for a in range(x.shape[0]):
            self._load(theta, a)
            with torch.enable_grad():
                f = masked_mean_ce(self.model(x[a]), y[a], mask[a])
                for o, g in zip(out, one(a, f)):
                    o[a] = g
        return out

    def grad(self, theta, x, y, mask):
        values = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)

        def one(a, f):
            values[a] = f.detach()
            return _or_zeros(torch.autograd.grad(f, self.params, allow_unused=True), self.params)

        return self._each(theta, x, y, mask, one), values

    def hvp(self, theta, v, x, y, mask):
        def one(a, f):
            return _double_backward(f, self.params, [t[a] for t in v])

        return self._each(theta, x, y, mask, one)


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


BACKENDS = {"stacked": Stacked, "vmap": Vmap, "chunked": Chunked, "loop": Loop}


def make(model: torch.nn.Module, strategy: str, chunk: int = 64):
    """The backend ``strategy`` (a name of :data:`BACKENDS`) for ``model``."""
    layout = ParamLayout.of(dict(model.named_parameters()))
    if strategy == "stacked":
        lifted = lift(model)
        if lifted.forward is None:
            raise ValueError(f"train.strategy = 'stacked': no stacked form of {type(model).__name__} "
                             f"({lifted.reason}); use vmap, chunked or loop")
        return Stacked(lifted.forward, layout)
    if strategy == "chunked":
        return Chunked(model, layout, chunk)
    if strategy in BACKENDS:
        return BACKENDS[strategy](model, layout)
    raise ValueError(f"strategy must be one of {', '.join(BACKENDS)}, got {strategy!r}")

"""Independent reference implementations of the meta-gradient, for tests and benchmarks only.

They share nothing with the engine's recursion (metagrad.py) or backends: parameters are dicts of
one agent's tensors, gradients come from plain torch.autograd (or torch.func for the unrolled
form). The tests compare every backend and flavour against :func:`agent_meta_gradient_autograd`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("exact", "fo", "hf")


def make_loss(model: torch.nn.Module) -> LossFn:
    """Masked mean cross-entropy of ``model`` applied functionally with ``params``."""

    def loss(params: Params, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (x,))
        ce = F.cross_entropy(logits, y, reduction="none")
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)

    return loss


def make_logits(model: torch.nn.Module):
    def logits(params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x,))

    return logits


def hvp_exact(loss: LossFn, theta: Params, v: Params, x, y, mask) -> Params:
    """∇²f(θ) v by reverse-over-reverse differentiation with torch.func (the vjp of ∇f)."""
    return vjp(lambda p: grad(loss)(p, x, y, mask), theta)[1](v)[0]


def _axpy(a: float, x: Params, y: Params) -> Params:
    """y + a·x, leaf by leaf."""
    return {k: y[k] + a * x[k] for k in y}


def _batch(X, Y, idx, mask, s: int):
    """(x, y, mask) of slot ``s``; a single slot serves every purpose ("full" batches)."""
    s = 0 if idx.shape[0] == 1 else s
    rows = idx[s]
    return X[rows], Y[rows], mask[s]


def hvp_finite_difference(loss: LossFn, theta: Params, v: Params, x, y, mask, delta: float) -> Params:
    """[∇f(θ + δv) − ∇f(θ − δv)] / 2δ — the Hessian-free estimate (Per-FedAvg HF)."""
    g_fn = grad(loss)
    plus = g_fn(_axpy(delta, v, theta), x, y, mask)
    minus = g_fn(_axpy(-delta, v, theta), x, y, mask)
    return {k: (plus[k] - minus[k]) / (2.0 * delta) for k in plus}



def agent_meta_gradient_autograd(loss: LossFn, params: Params, X, Y, idx, mask, nu: int, alpha: float,
                                 method: str = "exact", delta: float = 1e-3) -> tuple[Params, torch.Tensor]:
    """The reference: the recursion for ONE agent with plain torch.autograd (reverse-over-reverse
    HVPs), written independently of the backends and of :func:`meta_gradients` (tests compare
    every backend against it; it is also what per-agent loops elsewhere do)."""

    def batch(s: int):
        return _batch(X, Y, idx, mask, s)

    names = list(params)

    def grad_at(theta: Params, b, create_graph: bool = False):
        leaves = {k: (v if create_graph else v.detach()).requires_grad_(True) for k, v in theta.items()}
        with torch.enable_grad():
            value = loss(leaves, *b)
            g = torch.autograd.grad(value, [leaves[k] for k in names], create_graph=create_graph)
        return leaves, dict(zip(names, g)), value

    thetas = [{k: v.detach() for k, v in params.items()}]
    for l in range(nu):
        _, g, _ = grad_at(thetas[-1], batch(l))
        thetas.append({k: (thetas[-1][k] - alpha * g[k]).detach() for k in names})
    _, g, value = grad_at(thetas[nu], batch(nu))
    g = {k: v.detach() for k, v in g.items()}
    if method == "fo":
        return g, value.detach()
    for l in reversed(range(nu)):
        if method == "exact":
            with torch.enable_grad():
                leaves, gl, _ = grad_at({k: v.clone() for k, v in thetas[l].items()}, batch(nu + 1 + l), create_graph=True)
                hv = torch.autograd.grad([gl[k] for k in names], [leaves[k] for k in names],
                                         grad_outputs=[g[k] for k in names])
            hv = dict(zip(names, hv))
        elif method == "hf":
            hv = hvp_finite_difference(loss, thetas[l], g, *batch(nu + 1 + l), delta)
        else:
            raise ValueError(f"metagrad must be one of {METHODS}, got {method!r}")
        g = {k: g[k] - alpha * hv[k].detach() for k in names}
    return g, value.detach()


def agent_meta_gradient_unrolled(loss: LossFn, params: Params, X, Y, idx, mask, nu: int,
                                 alpha: float) -> tuple[Params, torch.Tensor]:
    """Exact meta-gradient by differentiating through the unrolled inner loop (memory grows with ν).

    Here the Hessians are taken on the inner batches D_l (the recursion uses independent batches
    D''_l); with one slot ("full" batches) both coincide. Used as a reference and in benchmarks.
    """

    def batch(s: int):
        return _batch(X, Y, idx, mask, s)

    def meta_loss(w: Params) -> torch.Tensor:
        theta = w
        for l in range(nu):
            theta = _axpy(-alpha, grad(loss)(theta, *batch(l)), theta)
        return loss(theta, *batch(nu))

    return grad_and_value(meta_loss)(params)



def block_meta_gradients_unrolled(loss: LossFn, params: Params, X, Y, idx, mask, nu: int,
                                  alpha: float) -> tuple[Params, torch.Tensor]:
    """:func:`agent_meta_gradient_unrolled` for a block (vmap over agents; MAML-style memory)."""
    return vmap(lambda p, i, m: agent_meta_gradient_unrolled(loss, p, X, Y, i, m, nu, alpha))(params, idx, mask)

"""The baseline: meta-gradients computed the way other FL simulators compute them.

One agent at a time in a Python loop, with a regular ``nn.Module`` whose parameters are loaded
with each agent's weights, and ``torch.autograd.grad``: plain backward for the inner and outer
gradients, double backward (``create_graph=True`` then a vector-Jacobian product) for the
Hessian-vector products. Same math as ``mpifedmeta.core.metagrad.agent_meta_gradient``:

    θ^0 = w,   θ^l = θ^{l-1} − α ∇f(θ^{l-1}; D_l)            l = 1..ν
    g = ∇f(θ^ν; D')
    for l = ν-1 … 0:   g = g − α ∇²f(θ^l; D''_l) g            (exact: double backward;
                                                              hf: [∇f(θ+δg) − ∇f(θ−δg)] / 2δ)
    fo: g = ∇f(θ^ν; D')

Batches are the engine's index tensors: ``idx`` (slots, b) per agent, slot l < ν for inner step
l, slot ν for D', slot ν+1+l for the HVP at θ^l (a single slot is used for everything). The
masks of the engine are all ones in the benchmarks, so the loss is the plain mean cross-entropy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class LoopBaseline:
    """Per-agent loop of autograd meta-gradients on one resident ``nn.Module``."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(True)
        self.names = [k for k, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]

    # -- helpers ---------------------------------------------------------------------------
    def _load(self, theta: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, theta):
                p.copy_(t)

    def _loss(self, x, y) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    def _grad(self, theta, x, y) -> tuple[list[torch.Tensor], torch.Tensor]:
        self._load(theta)
        loss = self._loss(x, y)
        return list(torch.autograd.grad(loss, self.params)), loss.detach()

    def _hvp(self, theta, v, x, y) -> list[torch.Tensor]:
        """∇²f(θ) v by double backward."""
        self._load(theta)
        g = torch.autograd.grad(self._loss(x, y), self.params, create_graph=True)
        return list(torch.autograd.grad(g, self.params, grad_outputs=v))

    # -- one agent -------------------------------------------------------------------------
    def meta_gradient(self, w: list[torch.Tensor], X, Y, idx, nu: int, alpha: float,
                      method: str = "exact", delta: float = 1e-3) -> tuple[list[torch.Tensor], torch.Tensor]:
        def batch(s):
            rows = idx[0 if idx.shape[0] == 1 else s]
            return X[rows], Y[rows]

        thetas = [w]
        for l in range(nu):
            g, _ = self._grad(thetas[-1], *batch(l))
            thetas.append([t - alpha * gi for t, gi in zip(thetas[-1], g)])
        g, value = self._grad(thetas[nu], *batch(nu))
        if method == "fo":
            return g, value
        for l in reversed(range(nu)):
            x, y = batch(nu + 1 + l)
            if method == "exact":
                hv = self._hvp(thetas[l], g, x, y)
            elif method == "hf":
                plus, _ = self._grad([t + delta * gi for t, gi in zip(thetas[l], g)], x, y)
                minus, _ = self._grad([t - delta * gi for t, gi in zip(thetas[l], g)], x, y)
                hv = [(a - b) / (2.0 * delta) for a, b in zip(plus, minus)]
            else:
                raise ValueError(f"unknown method {method!r}")
            g = [gi - alpha * h for gi, h in zip(g, hv)]
        return g, value

    # -- a block, the engine's interface ----------------------------------------------------
    def block_meta_gradients(self, params: dict, X, Y, idx, nu: int, alpha: float, method: str = "exact",
                             delta: float = 1e-3) -> tuple[dict, torch.Tensor]:
        """Loop over the B agents of ``params`` (stacked (B, ...)); same outputs as the engine."""
        B = idx.shape[0]
        grads = {k: torch.empty_like(params[k]) for k in self.names}
        values = torch.empty(B, dtype=X.dtype, device=X.device)
        for a in range(B):
            g, v = self.meta_gradient([params[k][a] for k in self.names], X, Y, idx[a], nu, alpha, method, delta)
            for k, gi in zip(self.names, g):
                grads[k][a] = gi
            values[a] = v
        return grads, values

    def local_update(self, params: dict, X, Y, idx, nu: int, alpha: float, beta: float,
                     method: str = "exact", delta: float = 1e-3) -> tuple[dict, torch.Tensor]:
        """τ chained local meta-steps, agent by agent (``idx``: (B, τ, slots, b))."""
        B, tau = idx.shape[0], idx.shape[1]
        out = {k: torch.empty_like(params[k]) for k in self.names}
        losses = torch.empty(B, tau, dtype=X.dtype, device=X.device)
        for a in range(B):
            w = [params[k][a].clone() for k in self.names]
            for t in range(tau):
                g, v = self.meta_gradient(w, X, Y, idx[a, t], nu, alpha, method, delta)
                w = [wi - beta * gi for wi, gi in zip(w, g)]
                losses[a, t] = v
            for k, wi in zip(self.names, w):
                out[k][a] = wi
        return out, losses

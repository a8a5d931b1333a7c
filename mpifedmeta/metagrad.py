"""The math of ν-step meta federated learning, as pure functions (tensors in, tensors out).

For agent i with local loss f_i, fine-tuning step α and ν fine-tuning steps:

    θ^0 = w,   θ^l = θ^{l-1} − α ∇f_i(θ^{l-1}; D_l)                         (l = 1..ν)
    ∇F_i(w) = (I − α∇²f_i(θ^0)) … (I − α∇²f_i(θ^{ν-1})) ∇f_i(θ^ν)

computed by the backward recursion (memory O(ν·d), never the whole unrolled graph):

    g = ∇f_i(θ^ν; D')
    for l = ν-1 … 0:   g = g − α ∇²f_i(θ^l; D''_l) g

Flavours: ``exact`` (Hessian-vector products by reverse-over-reverse autodiff), ``fo`` (first
order: the Hessian terms dropped) and ``hf`` (Hessian-free: central finite difference
[∇f(θ+δg) − ∇f(θ−δg)] / 2δ). ν = 0 is the FedAvg gradient.

Batches are given as index tensors into a block's data tensors ``X, Y`` (so that the samples are
gathered on the device only when a step needs them) plus a float mask (1 = real sample, 0 =
padding, used when agents with different sample counts are batched together). ``idx`` has one
row per *slot*: slot l < ν is the batch of inner step l, slot ν the outer batch D', slot ν+1+l
the batch of the Hessian-vector product at θ^l. A single slot (``idx.shape[0] == 1``) is used
for every purpose ("full" batches: each agent's whole training split).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

METHODS = ("exact", "fo", "hf")
STRATEGIES = ("vmap", "chunked", "loop")

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def num_slots(nu: int, method: str) -> int:
    """How many independent batches one meta-gradient needs: ν inner, 1 outer, ν for the HVPs."""
    if method not in METHODS:
        raise ValueError(f"metagrad must be one of {METHODS}, got {method!r}")
    return nu + 1 if method == "fo" else 2 * nu + 1


def _axpy(a: float, x: Params, y: Params) -> Params:
    """y + a·x, leaf by leaf."""
    return {k: y[k] + a * x[k] for k in y}


def _batch(X, Y, idx, mask, s: int):
    """(x, y, mask) of slot ``s``; a single slot serves every purpose ("full" batches)."""
    s = 0 if idx.shape[0] == 1 else s
    rows = idx[s]
    return X[rows], Y[rows], mask[s]


def finetune(loss: LossFn, params: Params, x, y, mask, steps: int, alpha: float) -> list[Params]:
    """θ^0..θ^steps of gradient descent with step α on one batch (x, y, mask); returns all iterates."""
    g_fn = grad(loss)
    thetas = [params]
    for _ in range(steps):
        thetas.append(_axpy(-alpha, g_fn(thetas[-1], x, y, mask), thetas[-1]))
    return thetas


def hvp_exact(loss: LossFn, theta: Params, v: Params, x, y, mask) -> Params:
    """∇²f(θ) v by reverse-over-reverse differentiation (the vjp of ∇f; H is symmetric).

    Measured faster than forward-over-reverse (jvp of grad) under vmap on CPU, and, unlike it,
    it goes through torch.compile (benchmarks/hvp_variants.py).
    """
    return vjp(lambda p: grad(loss)(p, x, y, mask), theta)[1](v)[0]


def hvp_finite_difference(loss: LossFn, theta: Params, v: Params, x, y, mask, delta: float) -> Params:
    """[∇f(θ + δv) − ∇f(θ − δv)] / 2δ — the Hessian-free estimate (Per-FedAvg HF)."""
    g_fn = grad(loss)
    plus = g_fn(_axpy(delta, v, theta), x, y, mask)
    minus = g_fn(_axpy(-delta, v, theta), x, y, mask)
    return {k: (plus[k] - minus[k]) / (2.0 * delta) for k in plus}


def agent_meta_gradient(loss: LossFn, params: Params, X: torch.Tensor, Y: torch.Tensor,
                        idx: torch.Tensor, mask: torch.Tensor, nu: int, alpha: float,
                        method: str = "exact", delta: float = 1e-3,
                        recompute: bool = False) -> tuple[Params, torch.Tensor]:
    """One agent's stochastic ν-step meta-gradient and its meta-loss f(θ^ν; D').

    ``idx``/``mask``: (slots, b) sample indices into X/Y and weights (see module docstring).
    ``recompute=True`` stores only θ^0 and recomputes each θ^l in the backward recursion: memory
    for the iterates O(d) instead of O(ν·d), at the price of ν(ν−1)/2 extra inner gradients.
    The recomputed iterates are the same operations on the same inputs, so the result is identical.
    """

    def batch(s: int):
        return _batch(X, Y, idx, mask, s)

    g_fn = grad(loss)

    def step(theta: Params, l: int) -> Params:
        return _axpy(-alpha, g_fn(theta, *batch(l)), theta)

    keep = method != "fo" and not recompute   # else only the last iterate: memory flat in ν
    thetas = [params]
    for l in range(nu):
        nxt = step(thetas[-1], l)
        thetas = thetas + [nxt] if keep else [nxt]
    g, value = grad_and_value(loss)(thetas[-1], *batch(nu))
    if method == "fo":
        return g, value
    for l in reversed(range(nu)):
        if recompute:
            theta_l = params
            for j in range(l):
                theta_l = step(theta_l, j)
        else:
            theta_l = thetas.pop(l)       # drop each stored iterate once its HVP is done
        if method == "exact":
            hv = hvp_exact(loss, theta_l, g, *batch(nu + 1 + l))
        elif method == "hf":
            hv = hvp_finite_difference(loss, theta_l, g, *batch(nu + 1 + l), delta)
        else:
            raise ValueError(f"metagrad must be one of {METHODS}, got {method!r}")
        g = _axpy(-alpha, hv, g)
    return g, value


def agent_meta_gradient_autograd(loss: LossFn, params: Params, X, Y, idx, mask, nu: int, alpha: float,
                                 method: str = "exact", delta: float = 1e-3) -> tuple[Params, torch.Tensor]:
    """The same recursion as :func:`agent_meta_gradient` with plain torch.autograd for one agent
    (reverse-over-reverse HVPs). Used by the ``loop`` strategy: outside vmap it avoids the
    per-call overhead of the torch.func transforms, and it is what per-agent loops elsewhere do."""

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


_compiled: dict = {}
_compile_failed: dict = {}


def compile_fallbacks() -> dict:
    """Why torch.compile fell back to eager execution, per compiled function (empty if it never did)."""
    return dict(_compile_failed)


def _vmapped_compiled(loss: LossFn, nu: int, alpha: float, method: str, delta: float):
    """torch.compile of the vmapped per-agent meta-gradient (cached per loss and hyper-parameters)."""
    key = (id(loss), nu, alpha, method, delta)
    if key not in _compiled:
        def one(p, i, m, X, Y):
            return agent_meta_gradient(loss, p, X, Y, i, m, nu, alpha, method, delta)
        _compiled[key] = torch.compile(vmap(one, in_dims=(0, 0, 0, None, None)), dynamic=False)
    return _compiled[key], key


def block_meta_gradients(loss: LossFn, params: Params, X, Y, idx, mask, nu: int, alpha: float,
                         method: str = "exact", delta: float = 1e-3, strategy: str = "vmap",
                         chunk: int = 64, unrolled: bool = False,
                         compile: bool = False, recompute: bool = False) -> tuple[Params, torch.Tensor]:
    """Meta-gradients of a block of B agents at once.

    ``params``: stacked parameters (B, ...); ``idx``/``mask``: (B, slots, b). Strategies give the
    same numbers: ``vmap`` (one batched pass), ``chunked`` (vmap over chunks of ``chunk`` agents,
    bounded memory) and ``loop`` (one agent at a time with plain torch.autograd, as other FL
    simulators compute; fastest where vmap turns per-agent weights into slow grouped kernels).
    ``compile=True`` runs the vmap strategies through torch.compile; where compiling fails (e.g.
    some transform combinations) it warns once and falls back to eager execution.
    Returns (meta-gradients stacked (B, ...), meta-losses (B,)).
    """
    if compile and not unrolled and not recompute and strategy in ("vmap", "chunked"):
        fn, key = _vmapped_compiled(loss, nu, alpha, method, delta)
        if key not in _compile_failed:
            try:
                step = chunk if strategy == "chunked" else idx.shape[0]
                parts = [fn({k: v[s:s + step] for k, v in params.items()}, idx[s:s + step], mask[s:s + step], X, Y)
                         for s in range(0, idx.shape[0], step)]
                return ({k: torch.cat([g[k] for g, _ in parts]) for k in params}, torch.cat([v for _, v in parts]))
            except Exception as e:  # torch.compile cannot handle every transform combination
                _compile_failed[key] = str(e).splitlines()[0] if str(e) else type(e).__name__
                import warnings
                warnings.warn(f"train.compile: torch.compile failed ({_compile_failed[key][:200]}); running eagerly")
    if unrolled:
        if method != "exact":
            raise ValueError("the unrolled form exists only for metagrad = 'exact'")

        def one(p, i, m):
            return agent_meta_gradient_unrolled(loss, p, X, Y, i, m, nu, alpha)
    else:
        def one(p, i, m):
            return agent_meta_gradient(loss, p, X, Y, i, m, nu, alpha, method, delta, recompute)

    B = idx.shape[0]
    if strategy == "vmap" or (strategy == "chunked" and B <= chunk):
        return vmap(one)(params, idx, mask)
    if strategy == "chunked":
        parts = [vmap(one)({k: v[s:s + chunk] for k, v in params.items()}, idx[s:s + chunk], mask[s:s + chunk])
                 for s in range(0, B, chunk)]
    elif strategy == "loop":
        parts = []
        for a in range(B):
            p_a = {k: p[a] for k, p in params.items()}
            if unrolled:
                g, v = one(p_a, idx[a], mask[a])
            else:
                g, v = agent_meta_gradient_autograd(loss, p_a, X, Y, idx[a], mask[a], nu, alpha, method, delta)
            parts.append(({k: t.unsqueeze(0) for k, t in g.items()}, v.unsqueeze(0)))
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    grads = {k: torch.cat([g[k] for g, _ in parts]) for k in params}
    return grads, torch.cat([v for _, v in parts])


def local_update(loss: LossFn, params: Params, X, Y, idx, mask, nu: int, alpha: float, beta: float,
                 method: str = "exact", delta: float = 1e-3, strategy: str = "vmap",
                 chunk: int = 64, compile: bool = False, recompute: bool = False) -> tuple[Params, torch.Tensor]:
    """τ chained local meta-steps w ← w − β·∇̃F_i(w) for a block of agents.

    ``params``: stacked starting models (B, ...); ``idx``/``mask``: (B, τ, slots, b), one set of
    independent batches per local step. Returns the final local models and meta-losses (B, τ).
    """
    losses = []
    for t in range(idx.shape[1]):
        g, value = block_meta_gradients(loss, params, X, Y, idx[:, t], mask[:, t], nu, alpha,
                                        method, delta, strategy, chunk, compile=compile, recompute=recompute)
        params = _axpy(-beta, g, params)
        losses.append(value)
    return params, torch.stack(losses, dim=1)


def personalized_metrics(loss: LossFn, logits_fn, params: Params, Xtr, Ytr, train_idx, train_mask,
                         Xte, Yte, test_idx, test_mask, ks: list[int], alpha: float,
                         chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Test loss and accuracy of each agent after k full-batch fine-tuning steps, for each k in ``ks``.

    ``params``: the (unbatched) global model; ``train_idx``/``train_mask``: (B, n_train_max) padded
    per-agent indices into Xtr/Ytr, likewise for the test split. Returns two (B, len(ks)) tensors.
    """
    kmax = max(ks) if ks else 0

    def one(tr_i, tr_m, te_i, te_m):
        thetas = finetune(loss, params, Xtr[tr_i], Ytr[tr_i], tr_m, kmax, alpha)
        x, y = Xte[te_i], Yte[te_i]
        losses, accs = [], []
        for k in ks:
            out = logits_fn(thetas[k], x)
            ce = F.cross_entropy(out, y, reduction="none")
            denom = te_m.sum().clamp_min(1.0)
            losses.append((ce * te_m).sum() / denom)
            accs.append(((out.argmax(-1) == y).to(te_m.dtype) * te_m).sum() / denom)
        return torch.stack(losses), torch.stack(accs)

    B = train_idx.shape[0]
    parts = [vmap(one)(train_idx[s:s + chunk], train_mask[s:s + chunk], test_idx[s:s + chunk], test_mask[s:s + chunk])
             for s in range(0, B, chunk)]
    if not parts:
        z = torch.zeros(0, len(ks), dtype=Xtr.dtype, device=Xtr.device)
        return z, z.clone()
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

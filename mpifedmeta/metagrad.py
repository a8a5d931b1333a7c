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

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

METHODS = ("exact", "fo", "hf")
STRATEGIES = ("stacked", "vmap", "chunked", "loop")
CAPTURES = ("off", "compile", "cudagraphs")

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MetaSpec:
    """What a meta-gradient is: ν fine-tuning steps of size α, the flavour, HF's δ, recompute."""
    nu: int
    alpha: float
    method: str = "exact"
    delta: float = 1e-3
    recompute: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"metagrad must be one of {METHODS}, got {self.method!r}")


def capture_mode(value) -> str:
    """train.compile as a capture mode: false → "off", true → "compile", or the string itself."""
    if value is True:
        return "compile"
    if value is False or value is None:
        return "off"
    if value not in CAPTURES:
        raise ValueError(f"train.compile must be true, false or one of {', '.join(CAPTURES)}, got {value!r}")
    return value


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


# --------------------------------------------------------------------------- the block recursion
# One ν-step recursion for every backend. A backend (mpifedmeta.backends) supplies, for stacked
# parameters (B, ...) and gathered batches x (B, b, ...), y (B, b), mask (B, b):
#   grad(params, x, y, mask)     -> (every agent's ∇f_i {name: (B, ...)}, the losses f_i (B,))
#   hvp(params, v, x, y, mask)   -> every agent's ∇²f_i(θ_i) v_i {name: (B, ...)}

Batches = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def gather(X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> Batches:
    """The samples of every slot at once: idx/mask (B, slots, b) → (slots, B, b, ...) tensors."""
    i = idx.transpose(0, 1)
    return X[i], Y[i], mask.transpose(0, 1)


def meta_gradients(backend, params: Params, batches: Batches, meta: MetaSpec) -> tuple[Params, torch.Tensor]:
    """Every agent's stochastic ν-step meta-gradient and meta-loss f_i(θ_i^ν; D'_i).

    ``params``: stacked (B, ...); ``batches``: (slots, B, b, ...) from :func:`gather`; slot l < ν
    is inner step l, slot ν the outer batch, slot ν+1+l the HVP batch at θ^l (one slot: all).
    ``meta.recompute`` stores only θ^0 and recomputes each θ^l in the backward recursion (memory
    O(d) instead of O(ν·d), ν(ν−1)/2 extra gradients; the same operations, the same numbers).
    """
    xs, ys, ms = batches
    nu, alpha = meta.nu, meta.alpha

    def batch(s: int):
        s = 0 if xs.shape[0] == 1 else s
        return xs[s], ys[s], ms[s]

    def step(theta: Params, l: int) -> Params:
        return _axpy(-alpha, backend.grad(theta, *batch(l))[0], theta)

    keep = meta.method != "fo" and not meta.recompute   # else only the last iterate: memory flat in ν
    thetas = [params]
    for l in range(nu):
        nxt = step(thetas[-1], l)
        thetas = thetas + [nxt] if keep else [nxt]
    g, value = backend.grad(thetas[-1], *batch(nu))
    if meta.method == "fo":
        return g, value
    for l in reversed(range(nu)):
        if meta.recompute:
            theta_l = params
            for j in range(l):
                theta_l = step(theta_l, j)
        else:
            theta_l = thetas.pop(l)       # drop each stored iterate once its HVP is done
        b = batch(nu + 1 + l)
        if meta.method == "exact":
            hv = backend.hvp(theta_l, g, *b)
        else:                             # hf: central difference of two gradients along g
            plus = backend.grad(_axpy(meta.delta, g, theta_l), *b)[0]
            minus = backend.grad(_axpy(-meta.delta, g, theta_l), *b)[0]
            hv = {k: (plus[k] - minus[k]) / (2.0 * meta.delta) for k in plus}
        g = _axpy(-alpha, hv, g)
    return g, value


def block_meta_gradients(backend, params: Params, X, Y, idx, mask, meta: MetaSpec) -> tuple[Params, torch.Tensor]:
    """Meta-gradients of a block of B agents: ``params`` stacked (B, ...), ``idx``/``mask``
    (B, slots, b) sample indices into X/Y and weights. Returns ((B, ...) gradients, (B,) losses)."""
    return meta_gradients(backend, params, gather(X, Y, idx, mask), meta)


def local_update(backend, params: Params, X, Y, idx, mask, meta: MetaSpec, beta: float,
                 capture: str = "off") -> tuple[Params, torch.Tensor]:
    """τ chained local meta-steps w ← w − β·∇̃F_i(w) for a block of agents.

    ``params``: stacked starting models (B, ...); ``idx``/``mask``: (B, τ, slots, b), one set of
    independent batches per local step. Returns the final local models and meta-losses (B, τ).
    ``capture`` ("compile" | "cudagraphs") runs the whole local round captured (see capture.py);
    it falls back to eager execution, with a one-line notice, wherever capture is not possible.
    """
    if capture != "off":
        from . import capture as cap
        out = cap.local_update(backend, params, X, Y, idx, mask, meta, beta, capture)
        if out is not None:
            return out
    return local_update_eager(backend, params, X, Y, idx, mask, meta, beta)


ROUND_GATHER_BYTES = 64 << 20   # gather a whole local round at once below this size, else step by step


def local_update_eager(backend, params: Params, X, Y, idx, mask, meta: MetaSpec,
                       beta: float) -> tuple[Params, torch.Tensor]:
    """:func:`local_update` without capture. The samples of all τ steps and slots are gathered
    in one indexing call (step by step when that would exceed ROUND_GATHER_BYTES); full batches,
    the same rows in every step (an expanded view), are gathered once."""
    tau = idx.shape[1]
    if tau == 1 or (idx.stride(1) == 0 and mask.stride(1) == 0):
        once = gather(X, Y, idx[:, 0], mask[:, 0])
        steps = lambda t: once                                                   # noqa: E731
    elif idx.numel() * X[0].numel() * X.element_size() <= ROUND_GATHER_BYTES:
        i = idx.permute(1, 2, 0, 3)                                              # (τ, slots, B, b)
        xs, ys, ms = X[i], Y[i], mask.permute(1, 2, 0, 3)
        steps = lambda t: (xs[t], ys[t], ms[t])                                  # noqa: E731
    else:
        steps = lambda t: gather(X, Y, idx[:, t], mask[:, t])                    # noqa: E731
    losses = []
    for t in range(tau):
        g, value = meta_gradients(backend, params, steps(t), meta)
        params = _axpy(-beta, g, params)
        losses.append(value)
    return params, torch.stack(losses, dim=1)


# --------------------------------------------------------------------------- references
# Independent of the backends and of the recursion above: used by the tests (and benchmarks).

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


# --------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class Split:
    """One split of a block's agents: samples X, Y and each agent's padded rows idx/mask (B, width)."""
    X: torch.Tensor
    Y: torch.Tensor
    idx: torch.Tensor
    mask: torch.Tensor


def personalized_metrics(backend, params: Params, train: Split, test: Split, ks: list[int], alpha: float,
                         chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Test loss and accuracy of each agent after k full-batch fine-tuning steps, for each k in ``ks``.

    ``params``: the (unbatched) global model; each agent is fine-tuned on its own padded training
    rows with step α, ``chunk`` agents at a time. Returns two (B, len(ks)) tensors.
    """
    kmax = max(ks) if ks else 0
    B = train.idx.shape[0]
    losses, accs = [], []
    for s in range(0, B, chunk):
        tr_i, tr_m = train.idx[s:s + chunk], train.mask[s:s + chunk]
        te_i, te_m = test.idx[s:s + chunk], test.mask[s:s + chunk]
        n = tr_i.shape[0]
        theta = {k: v.unsqueeze(0).expand((n,) + v.shape).clone() for k, v in params.items()}
        x, y, xt, yt = train.X[tr_i], train.Y[tr_i], test.X[te_i], test.Y[te_i]
        denom = te_m.sum(1).clamp_min(1.0)
        at = {}
        for j in range(kmax + 1):
            if j in ks:
                with torch.no_grad():
                    out = backend.logits(theta, xt)
                    ce = F.cross_entropy(out.flatten(0, 1), yt.flatten(), reduction="none").view(yt.shape)
                    at[j] = ((ce * te_m).sum(1) / denom,
                             ((out.argmax(-1) == yt).to(te_m.dtype) * te_m).sum(1) / denom)
            if j < kmax:
                theta = _axpy(-alpha, backend.grad(theta, x, y, tr_m)[0], theta)
        losses.append(torch.stack([at[k][0] for k in ks], dim=1))
        accs.append(torch.stack([at[k][1] for k in ks], dim=1))
    if not losses:
        z = torch.zeros(0, len(ks), dtype=train.X.dtype, device=train.X.device)
        return z, z.clone()
    return torch.cat(losses), torch.cat(accs)

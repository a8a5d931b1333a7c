"""The math of ν-step meta federated learning, as pure functions (tensors in, tensors out).

For agent i with local loss f_i, fine-tuning step α and ν fine-tuning steps:

    θ^0 = w,   θ^l = θ^{l-1} − α ∇f_i(θ^{l-1}; D_l)                         (l = 1..ν)
    ∇F_i(w) = (I − α∇²f_i(θ^0)) … (I − α∇²f_i(θ^{ν-1})) ∇f_i(θ^ν)

computed by the backward recursion (memory O(ν·d), never the whole unrolled graph):

    g = ∇f_i(θ^ν; D')
    for l = ν-1 … 0:   g = g − α ∇²f_i(θ^l; D''_l) g

Flavours (:data:`HVPS`): ``exact`` (Hessian-vector products by reverse-over-reverse autodiff),
``fo`` (first order: the Hessian terms dropped) and ``hf`` (Hessian-free: central finite
difference [∇f(θ+δg) − ∇f(θ−δg)] / 2δ). ν = 0 is the FedAvg gradient.

A block's models are lists of stacked parameter tensors (B, *shape) (layout.py); every update
is one multi-tensor ``torch._foreach_*`` call, in place wherever autograd no longer needs the
old value. Batches are index tensors into a
block's data ``X, Y`` (gathered on the device only when needed) plus a float mask (1 = real
sample, 0 = padding). ``idx`` has one row per *slot*: slot l < ν is the batch of inner step l,
slot ν the outer batch D', slot ν+1+l the batch of the Hessian-vector product at θ^l. A single
slot is used for every purpose ("full" batches: each agent's whole training split).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpifedmeta.core.losses import cross_entropy



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


# --------------------------------------------------------------------------- the flavours
# An HVP flavour returns (c, s) with ∇²f(θ) v ≈ s·c, so that the recursion applies it as ONE fused
# update g ← g − α·s·c. ``c`` is a fresh tensor. ``fo`` has no HVP.

Tensors = list[torch.Tensor]


def hvp_exact(backend, theta: Tensors, v: Tensors, batch, meta: MetaSpec):
    """∇²f(θ) v by reverse-over-reverse autodiff (the vjp of ∇f; H is symmetric)."""
    return backend.hvp(theta, v, *batch), 1.0


def hvp_finite_difference(backend, theta: Tensors, v: Tensors, batch, meta: MetaSpec):
    """[∇f(θ + δv) − ∇f(θ − δv)] / 2δ — the Hessian-free estimate (Per-FedAvg HF), the
    difference taken in place."""
    plus = backend.grad(torch._foreach_add(theta, v, alpha=meta.delta), *batch)[0]
    minus = backend.grad(torch._foreach_add(theta, v, alpha=-meta.delta), *batch)[0]
    torch._foreach_sub_(plus, minus)
    return plus, 0.5 / meta.delta


#: ``train.metagrad`` → the flavour's Hessian-vector product (None: first order, no HVP).
HVPS = {"exact": hvp_exact, "fo": None, "hf": hvp_finite_difference}
METHODS = tuple(HVPS)


def num_slots(nu: int, method: str) -> int:
    """How many independent batches one meta-gradient needs: ν inner, 1 outer, ν for the HVPs."""
    if method not in HVPS:
        raise ValueError(f"metagrad must be one of {METHODS}, got {method!r}")
    return nu + 1 if HVPS[method] is None else 2 * nu + 1


# --------------------------------------------------------------------------- the block recursion
# A backend (mpifedmeta.engine.backends) supplies, for models θ (lists of (B, *shape) tensors) and
# gathered batches x (B, b, ...), y (B, b), mask (B, b):
#   grad(theta, x, y, mask)     -> (every agent's ∇f_i as such a list, the losses f_i (B,))
#   hvp(theta, v, x, y, mask)   -> every agent's ∇²f_i(θ_i) v_i as such a list

Batches = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def take(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``X[idx]`` as one index_select of rows (measured 4x faster than advanced indexing for
    784-feature rows on the CPU)."""
    return X.index_select(0, idx.reshape(-1)).view(idx.shape + X.shape[1:])


def gather(X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> Batches:
    """The samples of every slot at once: idx/mask (B, slots, b) → (slots, B, b, ...) tensors."""
    i = idx.transpose(0, 1)
    return take(X, i), take(Y, i), mask.transpose(0, 1)


def fine_tune_step(backend, theta: Tensors, batch, alpha: float) -> Tensors:
    """θ − α∇f(θ; batch) as new tensors (one fused pass)."""
    return torch._foreach_add(theta, backend.grad(theta, *batch)[0], alpha=-alpha)


def meta_gradients(backend, theta: Tensors, batches: Batches, meta: MetaSpec) -> tuple[Tensors, torch.Tensor]:
    """Every agent's stochastic ν-step meta-gradient and meta-loss f_i(θ_i^ν; D'_i) (B,).

    ``theta``: the models (a list of (B, *shape) tensors), not modified; ``batches``: (slots, B, b, ...) from
    :func:`gather`; slot l < ν is inner step l, slot ν the outer batch, slot ν+1+l the HVP batch
    at θ^l (one slot: all). ``meta.recompute`` stores only θ^0 and recomputes each θ^l in the
    backward recursion (memory O(d) instead of O(ν·d), ν(ν−1)/2 extra gradients, same numbers).
    """
    xs, ys, ms = batches
    nu, alpha = meta.nu, meta.alpha
    hvp = HVPS[meta.method]

    def batch(s: int):
        s = 0 if xs.shape[0] == 1 else s
        return xs[s], ys[s], ms[s]

    keep = hvp is not None and not meta.recompute   # else only the last iterate: memory flat in ν
    thetas = [theta]
    for l in range(nu):
        nxt = fine_tune_step(backend, thetas[-1], batch(l), alpha)
        thetas = thetas + [nxt] if keep else [nxt]
    g, value = backend.grad(thetas[-1], *batch(nu))
    if hvp is None:
        return g, value
    for l in reversed(range(nu)):
        if meta.recompute:
            theta_l = theta
            for j in range(l):
                theta_l = fine_tune_step(backend, theta_l, batch(j), alpha)
        else:
            theta_l = thetas.pop(l)       # drop each stored iterate once its HVP is done
        c, s = hvp(backend, theta_l, g, batch(nu + 1 + l), meta)
        torch._foreach_add_(g, c, alpha=-alpha * s)
    return g, value


def block_meta_gradients(backend, theta: Tensors, X, Y, idx, mask, meta: MetaSpec) -> tuple[Tensors, torch.Tensor]:
    """Meta-gradients of a block of B agents: ``theta`` the models, ``idx``/``mask`` (B, slots, b)
    sample indices into X/Y and weights. Returns (the gradients, like ``theta``; (B,) losses)."""
    return meta_gradients(backend, theta, gather(X, Y, idx, mask), meta)


# Gather a whole local round at once below this size, else step by step. Kept under glibc's largest
# mmap threshold (32 MB, parallel/devices.tune_host_allocator): a larger gather is a fresh mmap every
# round, and its page faults made a 56 MB gather (784 features, 16 agents, ν = 3, τ = 5) cost 32 ms
# instead of the ~2 ms per step of five 11 MB gathers.
ROUND_GATHER_BYTES = 16 << 20


def round_steps(X, Y, idx, mask):
    """``steps(t)`` → the gathered batches of local step t. The samples of all τ steps and slots
    are gathered in one indexing call (step by step above ROUND_GATHER_BYTES); full batches, the
    same rows in every step (an expanded view), are gathered once."""
    tau = idx.shape[1]
    if tau == 1 or (idx.stride(1) == 0 and mask.stride(1) == 0):
        once = gather(X, Y, idx[:, 0], mask[:, 0])
        return lambda t: once
    if idx.numel() * X[0].numel() * X.element_size() <= ROUND_GATHER_BYTES:
        i = idx.permute(1, 2, 0, 3)                                              # (τ, slots, B, b)
        xs, ys, ms = take(X, i), take(Y, i), mask.permute(1, 2, 0, 3)
        return lambda t: (xs[t], ys[t], ms[t])
    return lambda t: gather(X, Y, idx[:, t], mask[:, t])


def local_update(backend, theta: torch.Tensor, X, Y, idx, mask, meta: MetaSpec,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """τ chained local meta-steps w ← w − β·∇̃F_i(w) for a block of agents, IN PLACE on ``theta``.

    ``theta``: the flat starting models (B, d), a tensor the caller owns (updated in place through
    ``backend.layout.views`` and returned); ``idx``/``mask``: (B, τ, slots, b), one set of
    independent batches per local step. Returns (the final local models, the meta-losses (B, τ)).
    (engine/compiled.py runs the same function captured by torch.compile or CUDA graphs.)
    """
    steps = round_steps(X, Y, idx, mask)
    params, losses = backend.layout.views(theta), []
    for t in range(idx.shape[1]):
        g, value = meta_gradients(backend, params, steps(t), meta)
        torch._foreach_add_(params, g, alpha=-beta)
        losses.append(value)
    return theta, torch.stack(losses, dim=1)


# --------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class Split:
    """One split of a block's agents: samples X, Y and each agent's padded rows idx/mask (B, width)."""
    X: torch.Tensor
    Y: torch.Tensor
    idx: torch.Tensor
    mask: torch.Tensor


def personalized_metrics(backend, w: torch.Tensor, train: Split, test: Split, ks: list[int],
                         alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Test loss and accuracy of each agent after k full-batch fine-tuning steps, for each k in ``ks``.

    ``w``: the flat global model (d,); each of the B agents of ``train``/``test`` is fine-tuned
    on its own padded training rows with step α, all at once. Returns two (B, len(ks)) tensors.
    """
    kmax = max(ks) if ks else 0
    n = train.idx.shape[0]
    theta = backend.layout.views(w.expand(n, w.shape[-1]).clone())
    x, y, xt, yt = take(train.X, train.idx), take(train.Y, train.idx), take(test.X, test.idx), take(test.Y, test.idx)
    at = {}
    for j in range(kmax + 1):
        if j in ks:
            at[j] = masked_metrics(backend, theta, xt, yt, test.mask)
        if j < kmax:
            torch._foreach_add_(theta, backend.grad(theta, x, y, train.mask)[0], alpha=-alpha)
    return torch.stack([at[k][0] for k in ks], dim=1), torch.stack([at[k][1] for k in ks], dim=1)


def masked_metrics(backend, theta: Tensors, xt: torch.Tensor, yt: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each agent's masked mean test loss and accuracy (B,) of the models θ on gathered x, y, mask."""
    denom = mask.sum(1).clamp_min(1.0)
    with torch.no_grad():
        out = backend.logits(theta, xt)
        ce = cross_entropy(out, yt)
        return (ce * mask).sum(1) / denom, ((out.argmax(-1) == yt).to(mask.dtype) * mask).sum(1) / denom


def test_metrics(backend, theta: Tensors, test: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_metrics` of the models θ on a test :class:`Split`."""
    return masked_metrics(backend, theta, take(test.X, test.idx), take(test.Y, test.idx), test.mask)

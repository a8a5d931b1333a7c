"""Plain float64 per-agent references of personalized federated-learning algorithms.

Written independently of the batched engine, one agent at a time, for comparison tests:
parameters are dicts {name: tensor} in ``model.named_parameters()`` order, the model is evaluated
with ``torch.func.functional_call(model, params, (x,))`` and gradients come from
``torch.autograd.grad``. The local loss is f(θ; D) = mean cross-entropy of the logits over D.

Every function that steps on data takes an optional ``batches``: a callable
``batch(step_kind, t) -> (x, y)`` giving the data of step ``t`` (0-based) of kind ``step_kind``
(kinds: "local", "inner", "personal", "head", "body", named in each docstring). By default every
step uses the full data (x, y). Nothing is modified in place; results are new float64 tensors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

Params = dict  # {name: float64 tensor}


# ----------------------------------------------------------------------------- helpers
def _f64(p: Params) -> Params:
    return {k: v.detach().to(torch.float64).clone() for k, v in p.items()}


def _batches(x, y, batches):
    return batches if batches is not None else (lambda kind, t: (x, y))


def loss(model, params: Params, x, y) -> torch.Tensor:
    """f(θ; D) = mean_j CE(model(θ; x_j), y_j)."""
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def grad(model, params: Params, x, y, names=None) -> Params:
    """∇f(θ; D) with respect to ``names`` (default: all parameters), as a dict."""
    names = list(params) if names is None else [n for n in params if n in names]
    p = {k: v.detach().clone().requires_grad_(k in names) for k, v in params.items()}
    g = torch.autograd.grad(loss(model, p, x, y), [p[n] for n in names])
    return {n: gi.detach() for n, gi in zip(names, g)}


# ----------------------------------------------------------------------------- 1. FedAvg
def fedavg_local(model, w, x, y, tau, beta, batches=None) -> Params:
    """w_i ← w; τ steps (kind "local") w_i ← w_i − β∇f(w_i; D_t). Returns w_i."""
    b = _batches(x, y, batches)
    wi = _f64(w)
    for t in range(tau):
        g = grad(model, wi, *b("local", t))
        wi = {k: wi[k] - beta * g[k] for k in wi}
    return wi


# ----------------------------------------------------------------------------- 2. FedProx
def fedprox_local(model, w, x, y, tau, beta, mu, batches=None) -> Params:
    """w_i ← w; τ steps (kind "local") w_i ← w_i − β·(∇f(w_i; D_t) + μ·(w_i − w)). Returns w_i."""
    b = _batches(x, y, batches)
    w0 = _f64(w)
    wi = _f64(w)
    for t in range(tau):
        g = grad(model, wi, *b("local", t))
        wi = {k: wi[k] - beta * (g[k] + mu * (wi[k] - w0[k])) for k in wi}
    return wi


# ----------------------------------------------------------------------------- 3. pFedMe
def _pfedme_inner(model, theta, anchor, xb, yb, lam, K, eta) -> Params:
    """K steps θ ← θ − η·(∇f(θ; D) + λ·(θ − anchor)) on one batch D."""
    for _ in range(K):
        g = grad(model, theta, xb, yb)
        theta = {k: theta[k] - eta * (g[k] + lam * (theta[k] - anchor[k])) for k in theta}
    return theta


def pfedme_local(model, w, x, y, tau, beta, lam, K, eta, batches=None) -> Params:
    """θ ← w, w_i ← w; for t = 0..τ−1: with D_t = batch("inner", t), K times
    θ ← θ − η·(∇f(θ; D_t) + λ·(θ − w_i)); then w_i ← w_i − β·λ·(w_i − θ).
    θ is carried over between t (not reset). Returns w_i (the upload)."""
    b = _batches(x, y, batches)
    wi = _f64(w)
    theta = _f64(w)
    for t in range(tau):
        theta = _pfedme_inner(model, theta, wi, *b("inner", t), lam, K, eta)
        wi = {k: wi[k] - beta * lam * (wi[k] - theta[k]) for k in wi}
    return wi


def pfedme_personal(model, w, x, y, lam, K, eta, batches=None) -> Params:
    """Personal model: θ ← w; K steps θ ← θ − η·(∇f(θ; D) + λ·(θ − w)), D = batch("inner", 0)
    (full data by default). Returns θ."""
    b = _batches(x, y, batches)
    return _pfedme_inner(model, _f64(w), _f64(w), *b("inner", 0), lam, K, eta)


# ----------------------------------------------------------------------------- 4. Ditto
def _ditto_personal_steps(model, w, v, lam, s, personal_lr, b) -> Params:
    """s steps (kind "personal") v ← v − lr_p·(∇f(v; D'_t) + λ·(v − w)), w fixed."""
    w0 = _f64(w)
    v = _f64(v)
    for t in range(s):
        g = grad(model, v, *b("personal", t))
        v = {k: v[k] - personal_lr * (g[k] + lam * (v[k] - w0[k])) for k in v}
    return v


def ditto_local(model, w, v, x, y, tau, beta, lam, s, personal_lr, batches=None):
    """Global part: w_i = fedavg_local (τ steps of kind "local", lr β).
    Personal part: from v (the stored personal model; the caller passes w if none), s steps
    (kind "personal") v ← v − lr_p·(∇f(v; D'_t) + λ·(v − w)), w = the round's global model.
    Returns (w_i, v)."""
    b = _batches(x, y, batches)
    wi = fedavg_local(model, w, x, y, tau, beta, batches=b)
    return wi, _ditto_personal_steps(model, w, v, lam, s, personal_lr, b)


def ditto_personal(model, w, v, x, y, lam, s, personal_lr, batches=None) -> Params:
    """v if given (not None), else s steps of the personal update above from v = w."""
    if v is not None:
        return _f64(v)
    return _ditto_personal_steps(model, w, w, lam, s, personal_lr, _batches(x, y, batches))


# ----------------------------------------------------------------------------- 5. FedRep
def _fedrep_head_steps(model, w, head_names, h, head_steps, head_lr, b) -> Params:
    """Full params (body of w, h) after head_steps steps (kind "head") h ← h − lr_h·∇_h f(φ, h; D_t)."""
    p = _f64(w)
    p.update(_f64(h))
    for t in range(head_steps):
        g = grad(model, p, *b("head", t), names=head_names)
        p = {k: (p[k] - head_lr * g[k]) if k in head_names else p[k] for k in p}
    return p


def fedrep_local(model, w, head_names, h, x, y, tau, beta, head_steps, head_lr, batches=None):
    """φ ← body of w. head_steps steps (kind "head") h ← h − lr_h·∇_h f(φ, h; D_t), φ fixed;
    then τ steps (kind "body") φ ← φ − β·∇_φ f(φ, h; D_t), h fixed.
    Returns (upload, h): upload = {body: φ, head: w's head unchanged}; h over head_names."""
    b = _batches(x, y, batches)
    head_names = set(head_names)
    body_names = [k for k in w if k not in head_names]
    p = _fedrep_head_steps(model, w, head_names, h, head_steps, head_lr, b)
    for t in range(tau):
        g = grad(model, p, *b("body", t), names=body_names)
        p = {k: (p[k] - beta * g[k]) if k in g else p[k] for k in p}
    w0 = _f64(w)
    upload = {k: (w0[k] if k in head_names else p[k]) for k in w}
    return upload, {k: p[k] for k in w if k in head_names}


def fedrep_personal(model, w, head_names, h, x, y, head_steps, head_lr, batches=None) -> Params:
    """Full params: (body of w, h) if h given, else (body of w, head after head_steps head steps
    from w's head with the body of w fixed)."""
    head_names = set(head_names)
    if h is not None:
        p = _f64(w)
        p.update(_f64(h))
        return p
    h0 = {k: v for k, v in w.items() if k in head_names}
    return _fedrep_head_steps(model, w, head_names, h0, head_steps, head_lr, _batches(x, y, batches))


# ----------------------------------------------------------------------------- 6. server
def server_step(w_flat, deltas, weights, opt, state, lr=1.0, momentum=0.9, beta1=0.9, beta2=0.99,
                eps=1e-3):
    """One server step (numpy float64). Δ = Σ c_i·Δ_i / Σ c_i with Δ_i = w_i − w.
    sgd:      w ← w + lr·Δ
    momentum: m ← μ·m + Δ;  w ← w + lr·m
    adagrad:  v ← v + Δ²;  m = Δ
    adam:     m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²
    yogi:     m as adam;  v ← v − (1−β2)·Δ²·sign(v − Δ²)
    adagrad/adam/yogi: w ← w + lr·m/(√v + eps)   (Reddi et al. 2021, Alg. 2, no bias correction).
    state: {'m', 'v'} (d,) arrays, or None for zeros. Returns (new w, new state)."""
    w = np.asarray(w_flat, dtype=np.float64)
    D = np.asarray(deltas, dtype=np.float64).reshape(-1, w.size)
    c = np.asarray(weights, dtype=np.float64)
    delta = (c[:, None] * D).sum(0) / c.sum()
    m = np.zeros_like(w) if state is None else np.array(state["m"], dtype=np.float64)
    v = np.zeros_like(w) if state is None else np.array(state["v"], dtype=np.float64)
    d2 = delta * delta
    if opt == "sgd":
        return w + lr * delta, {"m": m, "v": v}
    if opt == "momentum":
        m = momentum * m + delta
        return w + lr * m, {"m": m, "v": v}
    if opt == "adagrad":
        m, v = delta, v + d2
    elif opt == "adam":
        m = beta1 * m + (1 - beta1) * delta
        v = beta2 * v + (1 - beta2) * d2
    elif opt == "yogi":
        m = beta1 * m + (1 - beta1) * delta
        v = v - (1 - beta2) * d2 * np.sign(v - d2)
    else:
        raise ValueError(f"unknown server optimizer {opt!r}")
    return w + lr * m / (np.sqrt(v) + eps), {"m": m, "v": v}


# ----------------------------------------------------------------------------- 7. metrics
@torch.no_grad()
def personalized_metrics(model, params, x_test, y_test):
    """(mean CE loss, accuracy) of the model with ``params`` on (x_test, y_test), as floats."""
    logits = functional_call(model, _f64(params), (x_test,))
    return (float(F.cross_entropy(logits, y_test)),
            float((logits.argmax(-1) == y_test).to(torch.float64).mean()))

"""Self-test of tests/algorithm_reference.py: closed forms and reductions between algorithms.

Hand computations use torch.func.grad (not the module's own helper) so that they check it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import algorithm_reference as ar

HEAD = {"2.weight", "2.bias"}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(11, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    return model, w, x, y


def g_of(model, p, x, y):
    """Independent ∇f(p; x, y) via torch.func.grad."""
    return torch.func.grad(lambda q: F.cross_entropy(functional_call(model, q, (x,)), y))(p)


def close(a, b, tol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float64
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


def gd(model, p, x, y, steps, lr, names=None):
    for _ in range(steps):
        g = g_of(model, p, x, y)
        p = {k: p[k] - lr * g[k] if names is None or k in names else p[k] for k in p}
    return p


def test_fedavg_fedprox(setup):
    model, w, x, y = setup
    w_copy = {k: v.clone() for k, v in w.items()}
    a = ar.fedavg_local(model, w, x, y, 3, 0.3)
    close(a, gd(model, w, x, y, 3, 0.3))
    close(ar.fedprox_local(model, w, x, y, 3, 0.3, 0.0), a)
    # two FedProx steps by hand: the first has no proximal term, the second does
    mu, b = 2.0, 0.3
    w1 = {k: w[k] - b * g_of(model, w, x, y)[k] for k in w}
    g1 = g_of(model, w1, x, y)
    w2 = {k: w1[k] - b * (g1[k] + mu * (w1[k] - w[k])) for k in w}
    p = ar.fedprox_local(model, w, x, y, 2, b, mu)
    close(p, w2)
    assert max(float((p[k] - a[k]).abs().max()) for k in w) > 1e-6   # mu matters
    close(w, w_copy, 0)                                            # nothing modified in place


def test_batches_are_used(setup):
    model, w, x, y = setup
    halves = [(x[:5], y[:5]), (x[5:], y[5:])]
    seen = []

    def batch(kind, t):
        seen.append((kind, t))
        return halves[t % 2]
    a = ar.fedavg_local(model, w, x, y, 2, 0.5, batches=batch)
    assert seen == [("local", 0), ("local", 1)]
    h = gd(model, gd(model, w, *halves[0], 1, 0.5), *halves[1], 1, 0.5)
    close(a, h)


def test_pfedme(setup):
    model, w, x, y = setup
    beta, lam, eta = 0.7, 3.0, 0.05
    g = g_of(model, w, x, y)
    # K=1, τ=1: w − βλ·(w − (w − η∇f(w))) = w − βλη∇f(w)
    close(ar.pfedme_local(model, w, x, y, 1, beta, lam, 1, eta), {k: w[k] - beta * lam * eta * g[k] for k in w})
    close(ar.pfedme_personal(model, w, x, y, lam, 1, eta), {k: w[k] - eta * g[k] for k in w})
    # τ=2, K=2 by hand, θ carried over between outer steps
    th, wi = dict(w), dict(w)
    for _ in range(2):
        for _ in range(2):
            gt = g_of(model, th, x, y)
            th = {k: th[k] - eta * (gt[k] + lam * (th[k] - wi[k])) for k in w}
        wi = {k: wi[k] - beta * lam * (wi[k] - th[k]) for k in w}
    close(ar.pfedme_local(model, w, x, y, 2, beta, lam, 2, eta), wi)
    # resetting θ to w_i at the second outer step would give a different answer
    w1 = {k: w[k] - beta * lam * (w[k] - gd_prox(model, w, w, x, y, 2, eta, lam)[k]) for k in w}
    w2r = {k: w1[k] - beta * lam * (w1[k] - gd_prox(model, w1, w1, x, y, 2, eta, lam)[k]) for k in w}
    assert max(float((wi[k] - w2r[k]).abs().max()) for k in w) > 1e-8


def gd_prox(model, p, anchor, x, y, steps, lr, lam):
    for _ in range(steps):
        g = g_of(model, p, x, y)
        p = {k: p[k] - lr * (g[k] + lam * (p[k] - anchor[k])) for k in p}
    return p


def test_ditto(setup):
    model, w, x, y = setup
    v0 = {k: w[k] + 0.1 * torch.randn_like(w[k]) for k in w}
    wi, v = ar.ditto_local(model, w, v0, x, y, 3, 0.2, 0.0, 4, 0.1)
    close(wi, ar.fedavg_local(model, w, x, y, 3, 0.2))
    close(v, ar.fedavg_local(model, v0, x, y, 4, 0.1))            # λ=0: plain GD on v
    _, v = ar.ditto_local(model, w, v0, x, y, 3, 0.2, 1.5, 4, 0.1)
    close(v, gd_prox(model, v0, w, x, y, 4, 0.1, 1.5))             # anchor = round's global w
    close(ar.ditto_personal(model, w, v0, x, y, 1.5, 4, 0.1), v0)
    close(ar.ditto_personal(model, w, None, x, y, 1.5, 4, 0.1), ar.ditto_local(model, w, w, x, y, 1, 0.2, 1.5, 4, 0.1)[1])


def test_fedrep(setup):
    model, w, x, y = setup
    h0 = {k: w[k] + 0.1 * torch.randn_like(w[k]) for k in HEAD}
    body = [k for k in w if k not in HEAD]
    # head_steps=0: body = masked FedAvg on (φ, h0); upload head = w's head; h unchanged
    up, h = ar.fedrep_local(model, w, HEAD, h0, x, y, 3, 0.2, 0, 0.1)
    ref = gd(model, {**w, **h0}, x, y, 3, 0.2, names=body)
    close(up, {k: w[k] if k in HEAD else ref[k] for k in w})
    close(h, h0)
    # τ=0: head-only GD with the body of w fixed; upload = w
    up, h = ar.fedrep_local(model, w, HEAD, h0, x, y, 0, 0.2, 5, 0.1)
    close(up, w)
    refh = gd(model, {**w, **h0}, x, y, 5, 0.1, names=HEAD)
    close(h, {k: refh[k] for k in HEAD})
    # both: head first, then the body with the new head
    up, h = ar.fedrep_local(model, w, HEAD, h0, x, y, 2, 0.2, 5, 0.1)
    ref = gd(model, refh, x, y, 2, 0.2, names=body)
    close(up, {k: w[k] if k in HEAD else ref[k] for k in w})
    # personal
    close(ar.fedrep_personal(model, w, HEAD, h0, x, y, 5, 0.1), {**w, **h0})
    hw = gd(model, w, x, y, 5, 0.1, names=HEAD)
    close(ar.fedrep_personal(model, w, HEAD, None, x, y, 5, 0.1), hw)


def test_server():
    rng = np.random.default_rng(0)
    w = rng.normal(size=6)
    D = rng.normal(size=(3, 6))
    c = np.array([1, 2, 5])
    mean = (c[:, None] * D).sum(0) / 8
    w1, _ = ar.server_step(w, D, c, "sgd", None, lr=1.0)
    np.testing.assert_allclose(w1, w + mean, rtol=1e-14)
    np.testing.assert_allclose(w1, ((w + D) * c[:, None]).sum(0) / 8, rtol=1e-12)   # = weighted mean of w_i
    lr, b1, b2, eps = 0.5, 0.9, 0.99, 1e-3
    wa, sa = ar.server_step(w, D, c, "adam", None, lr=lr, beta1=b1, beta2=b2, eps=eps)
    np.testing.assert_allclose(wa, w + lr * (1 - b1) * mean / (np.sqrt((1 - b2) * mean**2) + eps), rtol=1e-14)
    wy, sy = ar.server_step(w, D, c, "yogi", None, lr=lr, beta1=b1, beta2=b2, eps=eps)
    np.testing.assert_allclose(wy, wa, rtol=1e-14)
    np.testing.assert_allclose(sy["v"], sa["v"], rtol=1e-14)
    # second yogi step with the same Δ: v = 0.01Δ² < Δ² ⇒ v ← v + (1−β2)Δ²; adam: v ← β2·v + (1−β2)Δ²
    _, sy2 = ar.server_step(w, D, c, "yogi", sy, beta2=b2)
    np.testing.assert_allclose(sy2["v"], 2 * (1 - b2) * mean**2, rtol=1e-14)
    # yogi with v > Δ²: v decreases by (1−β2)Δ²
    big = {"m": np.zeros(6), "v": 10 * mean**2}
    _, sy3 = ar.server_step(w, D, c, "yogi", big, beta2=b2)
    np.testing.assert_allclose(sy3["v"], (10 - (1 - b2)) * mean**2, rtol=1e-14)
    # momentum, two steps by hand
    D2 = rng.normal(size=(3, 6))
    mean2 = (c[:, None] * D2).sum(0) / 8
    wm, sm = ar.server_step(w, D, c, "momentum", None, lr=lr, momentum=0.9)
    wm, sm = ar.server_step(wm, D2, c, "momentum", sm, lr=lr, momentum=0.9)
    np.testing.assert_allclose(wm, w + lr * mean + lr * (0.9 * mean + mean2), rtol=1e-14)
    # adagrad, two steps
    wg, sg = ar.server_step(w, D, c, "adagrad", None, lr=lr, eps=eps)
    wg, sg = ar.server_step(wg, D2, c, "adagrad", sg, lr=lr, eps=eps)
    v2 = mean**2 + mean2**2
    np.testing.assert_allclose(wg, w + lr * mean / (np.abs(mean) + eps) + lr * mean2 / (np.sqrt(v2) + eps), rtol=1e-13)
    with pytest.raises(ValueError):
        ar.server_step(w, D, c, "nope", None)


def test_metrics(setup):
    model, w, x, y = setup
    loss, acc = ar.personalized_metrics(model, w, x, y)
    with torch.no_grad():
        logits = model(x)
    assert isinstance(loss, float) and isinstance(acc, float)
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-14)
    assert acc == pytest.approx(float((logits.argmax(1) == y).double().mean()), rel=1e-14)

"""Correctness tests for the math core (``mpifedmeta.core.metagrad``).

Everything is checked against an *independent* reference written here: a plain ``nn.Module``
(built with ``build_model``, parameters copied in from the dict) differentiated with
``torch.autograd.grad`` (double backward for Hessian-vector products), one agent at a time in a
Python loop, with a hand-written masked cross-entropy.  No ``torch.func`` in the reference.

Precision tests are in float64 (explicit dtypes, the global default dtype is never changed).
Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations


import pytest
import torch
from torch.func import grad, vmap

from mpifedmeta.engine import backends
from mpifedmeta.core import metagrad as mg
from mpifedmeta.core import reference as ref
import engine_api as api
from mpifedmeta.core.layout import ParamLayout
from mpifedmeta.models import build_model, param_dict

F64 = torch.float64
F32 = torch.float32
NUM_CLASSES = 3
SHAPES = {"linear": (6,), "mlp": (6,), "cnn": (1, 8, 8)}
HIDDEN = {"linear": None, "mlp": (10, 8), "cnn": (16,)}


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """build_model initialises from the global RNG: seed it, and restore its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        yield


def report(tag: str, **values) -> None:
    print(f"\n[{tag}] " + " ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in values.items()), end="")


# --------------------------------------------------------------------------- helpers

def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in p.values()])


def rel(a: dict | torch.Tensor, b: dict | torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the flattened (unbatched) gradient."""
    a = flat(a) if isinstance(a, dict) else a.reshape(-1)
    b = flat(b) if isinstance(b, dict) else b.reshape(-1)
    return float((a - b).norm() / b.norm())


def bmg(P, params, idx, mask, nu, alpha, method="exact", delta=1e-3, strategy=None, chunk=64, recompute=False):
    """mg.block_meta_gradients with P's model on the backend ``strategy`` (default: the model's default)."""
    backend = backends.make(P.module, strategy or backends.default_strategy(P.module), chunk)
    return api.block_meta_gradients(backend, params, P.X, P.Y, idx, mask, mg.MetaSpec(nu, alpha, method, delta, recompute))


def agent(p: dict[str, torch.Tensor], a: int) -> dict[str, torch.Tensor]:
    return {k: v[a] for k, v in p.items()}


def max_rel_agents(batched: dict, per_agent: list[dict]) -> float:
    return max(rel(agent(batched, a), ref) for a, ref in enumerate(per_agent))


def axpy(a: float, x: dict, y: dict) -> dict:
    return {k: y[k] + a * x[k] for k in y}


class Problem:
    """A block of B agents: a model, stacked per-agent parameters (all different), data X, Y."""

    def __init__(self, name: str, B: int = 5, n: int = 40, dtype=F64, seed: int = 0):
        self.name, self.B, self.dtype = name, B, dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.module = build_model(name, SHAPES[name], NUM_CLASSES, HIDDEN[name]).to(dtype)
        self.loss = ref.make_loss(self.module)
        self.logits = ref.make_logits(self.module)
        self.w0 = param_dict(self.module)
        self.params = {}
        for k, v in self.w0.items():
            scale = float(v.abs().mean().clamp_min(1e-2))
            noise = torch.randn((B,) + tuple(v.shape), generator=self.gen, dtype=dtype)
            self.params[k] = v.unsqueeze(0).expand((B,) + tuple(v.shape)).clone() + 0.3 * scale * noise
        self.X = torch.randn((n,) + SHAPES[name], generator=self.gen, dtype=dtype)
        self.Y = torch.randint(0, NUM_CLASSES, (n,), generator=self.gen)
        self.n = n
        self.ref = Reference(name, dtype)

    def batches(self, slots: int, b: int = 8, pad: bool = True, lead: tuple[int, ...] = ()):
        """Random (B, *lead, slots, b) indices and 0/1 masks, with zero padding at the end of rows."""
        shape = (self.B,) + lead + (slots, b)
        idx = torch.randint(0, self.n, shape, generator=self.gen)
        mask = torch.ones(shape, dtype=self.dtype)
        if pad:
            real = torch.randint(b // 2, b + 1, shape[:-1], generator=self.gen)
            mask = (torch.arange(b) < real.unsqueeze(-1)).to(self.dtype)
            assert (mask == 0).any()
        return idx, mask


class Reference:
    """Per-agent reference with a plain nn.Module and torch.autograd (no torch.func)."""

    def __init__(self, name: str, dtype):
        self.m = build_model(name, SHAPES[name], NUM_CLASSES, HIDDEN[name]).to(dtype)
        self.names = [k for k, _ in self.m.named_parameters()]

    def load(self, theta: dict) -> list[torch.Tensor]:
        with torch.no_grad():
            for k, p in self.m.named_parameters():
                p.copy_(theta[k])
        return [p for _, p in self.m.named_parameters()]

    def loss(self, x, y, m) -> torch.Tensor:
        logp = torch.log_softmax(self.m(x), dim=-1)
        nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
        return (nll * m).sum() / torch.clamp(m.sum(), min=1.0)

    def value(self, theta, batch) -> torch.Tensor:
        self.load(theta)
        with torch.no_grad():
            return self.loss(*batch)

    def grad(self, theta, batch) -> dict:
        ps = self.load(theta)
        gs = torch.autograd.grad(self.loss(*batch), ps, allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(p)).detach()
                for k, g, p in zip(self.names, gs, ps)}

    def hvp(self, theta, v, batch) -> dict:
        """∇²f(θ) v by double backward: ∇_θ ⟨∇f(θ), v⟩."""
        ps = self.load(theta)
        gs = torch.autograd.grad(self.loss(*batch), ps, create_graph=True)
        dot = sum((g * v[k]).sum() for k, g in zip(self.names, gs))
        hv = torch.autograd.grad(dot, ps, allow_unused=True)
        return {k: (h if h is not None else torch.zeros_like(p)).detach()
                for k, h, p in zip(self.names, hv, ps)}

    def hvp_fd(self, theta, v, batch, delta) -> dict:
        plus = self.grad(axpy(delta, v, theta), batch)
        minus = self.grad(axpy(-delta, v, theta), batch)
        return {k: (plus[k] - minus[k]) / (2 * delta) for k in plus}

    def inner(self, w, batches, alpha) -> list[dict]:
        """θ^0..θ^ν, one plain gradient step per batch."""
        thetas = [w]
        for bt in batches:
            thetas.append(axpy(-alpha, self.grad(thetas[-1], bt), thetas[-1]))
        return thetas

    def meta_gradient(self, w, X, Y, idx, mask, nu, alpha, method="exact", delta=1e-3,
                      wrong_hessian_point=False):
        """g = ∇f(θ^ν; D'); for l = ν-1..0: g = g − α H(θ^l; D''_l) g  (idx: (slots, b))."""

        def batch(s):
            s = 0 if idx.shape[0] == 1 else s
            return X[idx[s]], Y[idx[s]], mask[s]

        thetas = self.inner(w, [batch(l) for l in range(nu)], alpha)
        g = self.grad(thetas[nu], batch(nu))
        value = self.value(thetas[nu], batch(nu))
        if method == "fo":
            return g, value
        for l in reversed(range(nu)):
            at = thetas[l + 1] if wrong_hessian_point else thetas[l]
            if method == "exact":
                hv = self.hvp(at, g, batch(nu + 1 + l))
            else:
                hv = self.hvp_fd(at, g, batch(nu + 1 + l), delta)
            g = axpy(-alpha, hv, g)
        return g, value

    def block(self, P: Problem, params, idx, mask, nu, alpha, **kw):
        out = [self.meta_gradient(agent(params, a), P.X, P.Y, idx[a], mask[a], nu, alpha, **kw)
               for a in range(P.B)]
        return [g for g, _ in out], torch.stack([v for _, v in out])

    def F(self, w, x, y, nu, alpha) -> torch.Tensor:
        """F(w) = f(θ^ν) with ν full-batch plain gradient steps on (x, y) (no mask: real samples only)."""
        ones = torch.ones(len(y), dtype=x.dtype)
        thetas = self.inner(w, [(x, y, ones)] * nu, alpha)
        return self.value(thetas[nu], (x, y, ones))


# --------------------------------------------------------------------------- 1. reference

CASES_1 = [(m, nu) for m in ("linear", "mlp") for nu in (0, 1, 2, 3)] + [("cnn", nu) for nu in (0, 1, 2)]


@pytest.mark.parametrize("model,nu", CASES_1)
def test_block_matches_independent_reference(model, nu):
    P = Problem(model, B=5)
    alpha, delta = 0.1, 1e-3
    idx, mask = P.batches(mg.num_slots(nu, "exact"))
    errs = {}
    for method in mg.METHODS:
        g, v = bmg(P, P.params, idx, mask, nu, alpha, method, delta)
        g_ref, v_ref = P.ref.block(P, P.params, idx, mask, nu, alpha, method=method, delta=delta)
        errs[method] = max_rel_agents(g, g_ref)
        errs[method + "_loss"] = float(((v - v_ref).abs() / v_ref.abs()).max())
    report(f"1 ref {model} nu={nu}", **errs)
    assert errs["exact"] < 1e-10
    assert errs["fo"] < 1e-10
    assert errs["hf"] < 1e-8
    for method in mg.METHODS:
        assert errs[method + "_loss"] < 1e-12
    # the agents really have different parameters and batches: their gradients differ
    assert rel(agent(g, 0), agent(g, 1)) > 1e-3


# --------------------------------------------------------------------------- 2. finite differences

@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("nu", [1, 2, 4])
def test_meta_gradient_matches_finite_differences_of_F(model, nu):
    P = Problem(model, B=2, n=30, seed=nu)
    alpha, eps = 0.2, 1e-5
    b = 12
    idx = torch.randint(0, P.n, (P.B, 1, b), generator=P.gen)
    real = torch.tensor([9, 12])  # agent 0 has 3 padding entries pointing at real samples
    mask = (torch.arange(b) < real[:, None, None]).to(F64)
    g, _ = bmg(P, P.params, idx, mask, nu, alpha, "exact")
    worst = 0.0
    for a in range(P.B):
        rows = idx[a, 0, : int(real[a])]
        x, y = P.X[rows], P.Y[rows]
        w = agent(P.params, a)
        ga = flat(agent(g, a))
        for _ in range(3):
            u = torch.randn(ga.shape, generator=P.gen, dtype=F64)
            u = u / u.norm()
            U = ParamLayout.of(w).split(u)
            fd = (P.ref.F(axpy(eps, U, w), x, y, nu, alpha) - P.ref.F(axpy(-eps, U, w), x, y, nu, alpha)) / (2 * eps)
            an = ga @ u
            err = float((fd - an).abs() / an.abs())
            worst = max(worst, err)
    report(f"2 fd {model} nu={nu}", max_rel_err=worst)
    assert worst < 1e-6


def test_mask_padding_changes_the_gradient():
    """Sanity for test 2: the padded entries would change the result if they were counted."""
    P = Problem("linear", B=1, n=30)
    idx = torch.randint(0, P.n, (1, 1, 12), generator=P.gen)
    mask = (torch.arange(12) < 9).to(F64).reshape(1, 1, 12)
    g_mask, _ = bmg(P, P.params, idx, mask, 2, 0.2)
    g_full, _ = bmg(P, P.params, idx, torch.ones_like(mask), 2, 0.2)
    assert rel(g_mask, g_full) > 1e-2


# --------------------------------------------------------------------------- 3. ν = 0 is FedAvg

@pytest.mark.parametrize("model", ["linear", "mlp", "cnn"])
def test_nu0_is_fedavg_gradient(model):
    P = Problem(model, B=5)
    idx, mask = P.batches(1)
    x, y, m = P.X[idx[:, 0]], P.Y[idx[:, 0]], mask[:, 0]
    plain = vmap(grad(P.loss))(P.params, x, y, m)
    ref = [P.ref.grad(agent(P.params, a), (x[a], y[a], m[a])) for a in range(P.B)]
    errs = {}
    for method in mg.METHODS:
        for strategy in backends.BACKENDS:
            g, _ = bmg(P, P.params, idx, mask, 0, 0.1, method,
                                           strategy=strategy, chunk=2)
            if strategy == "vmap":
                for k in g:
                    assert torch.equal(g[k], plain[k]), (method, k)
            errs[f"{method}_{strategy}"] = max_rel_agents(g, ref)
    report(f"3 nu=0 {model}", max_rel_vs_ref=max(errs.values()))
    assert max(errs.values()) < 1e-14


# --------------------------------------------------------------------------- 4. FO

@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("nu", [1, 3])
def test_fo_is_gradient_at_theta_nu(model, nu):
    P = Problem(model, B=5, seed=10 + nu)
    alpha = 0.3
    errs = []
    for slots in (nu + 1, 2 * nu + 1, 1):  # fo needs ν+1 slots; extra HVP slots are ignored
        idx, mask = P.batches(slots)
        g, _ = bmg(P, P.params, idx, mask, nu, alpha, "fo")
        for a in range(P.B):
            bt = [(P.X[idx[a, s]], P.Y[idx[a, s]], mask[a, s]) for s in range(slots)]
            bt = bt * (nu + 1) if slots == 1 else bt
            thetas = P.ref.inner(agent(P.params, a), bt[:nu], alpha)
            expect = P.ref.grad(thetas[nu], bt[nu])
            errs.append(rel(agent(g, a), expect))
            assert rel(expect, P.ref.grad(thetas[0], bt[nu])) > 1e-3  # θ^ν really moved
    report(f"4 fo {model} nu={nu}", max_rel_err=max(errs))
    assert max(errs) < 1e-12


# --------------------------------------------------------------------------- 5. HF

def test_hf_converges_to_exact_as_delta_shrinks():
    P = Problem("linear", B=5, seed=3)
    nu, alpha = 2, 0.3
    idx, mask = P.batches(mg.num_slots(nu, "hf"))
    exact, _ = bmg(P, P.params, idx, mask, nu, alpha, "exact")
    errs = []
    for delta in (1e-1, 1e-2, 1e-3, 1e-4):
        hf, _ = bmg(P, P.params, idx, mask, nu, alpha, "hf", delta)
        errs.append(max(rel(agent(hf, a), agent(exact, a)) for a in range(P.B)))
    report("5 hf->exact", **{f"delta={d:g}": e for d, e in zip((1e-1, 1e-2, 1e-3, 1e-4), errs)})
    for e1, e2 in zip(errs, errs[1:]):
        assert e2 < e1 / 50  # central differences: O(δ²), a factor ~100 per decade (measured 99)
    assert errs[-1] < 2e-8  # measured 4.4e-9
    assert errs[0] > 1e-6  # δ = 0.1 is visibly inexact: the comparison is not vacuous


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_hvp_finite_difference_perturbs_along_v(model):
    """Catches "HF perturbs θ by a scalar δ instead of δ·v"."""
    P = Problem(model, B=1, seed=5)
    theta = agent(P.params, 0)
    idx = torch.randint(0, P.n, (16,), generator=P.gen)
    bt = (P.X[idx], P.Y[idx], torch.ones(16, dtype=F64))
    errs = []
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=P.gen, dtype=F64) for k, t in theta.items()}
        ex = ref.hvp_exact(P.loss, theta, v, *bt)
        fd = ref.hvp_finite_difference(P.loss, theta, v, *bt, 1e-5)
        errs.append(rel(fd, ex))
        assert rel(ex, P.ref.hvp(theta, v, bt)) < 1e-12
        # the buggy variant (θ ± δ, every coordinate shifted by the scalar δ) is far off
        ones = {k: torch.ones_like(t) for k, t in theta.items()}
        bad = ref.hvp_finite_difference(P.loss, theta, ones, *bt, 1e-5)
        assert rel(bad, ex) > 1e-1
    report(f"5 hvp_fd {model}", max_rel_err=max(errs))
    assert max(errs) < 1e-6


# --------------------------------------------------------------------------- 6. unrolled

@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("nu", [1, 3])
def test_unrolled_equals_recursive_with_one_slot(model, nu):
    P = Problem(model, B=5, seed=20 + nu)
    idx, mask = P.batches(1, b=10)
    rec, v_rec = bmg(P, P.params, idx, mask, nu, 0.2, "exact")
    unr, v_unr = ref.block_meta_gradients_unrolled(P.loss, P.params, P.X, P.Y, idx, mask, nu, 0.2)
    err = max(rel(agent(unr, a), agent(rec, a)) for a in range(P.B))
    report(f"6 unrolled {model} nu={nu}", max_rel_err=err)
    assert err < 1e-10
    assert float((v_rec - v_unr).abs().max()) < 1e-13


# --------------------------------------------------------------------------- 7. strategies

@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 1e-5)])
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_strategies_agree(model, dtype, tol):
    P = Problem(model, B=5, dtype=dtype, seed=7)
    nu, alpha = 2, 0.2
    delta = 1e-3 if dtype == F64 else 1e-2
    idx, mask = P.batches(mg.num_slots(nu, "exact"))
    worst = {}
    for method in mg.METHODS:
        out = {s: bmg(P, P.params, idx, mask, nu, alpha, method,
                                          delta, strategy=s, chunk=2)
               for s in backends.BACKENDS}
        g0, v0 = out["vmap"]
        for s in ("stacked", "chunked", "loop"):
            g, v = out[s]
            assert set(g) == set(g0) and all(g[k].shape == g0[k].shape for k in g)
            e = max(rel(agent(g, a), agent(g0, a)) for a in range(P.B))
            worst[f"{method}_{s}"] = e
            assert float(((v - v0).abs() / v0.abs()).max()) < tol
    report(f"7 strategies {model} {str(dtype)[6:]}", **worst)
    assert max(worst.values()) < tol
    with pytest.raises(ValueError):
        bmg(P, P.params, idx, mask, nu, alpha, strategy="nope", chunk=2)


# --------------------------------------------------------------------------- 8. local_update

@pytest.mark.parametrize("method", mg.METHODS)
def test_local_update_chains_tau_steps(method):
    P = Problem("mlp", B=5, seed=8)
    nu, alpha, beta, tau = 2, 0.2, 0.5, 3
    idx, mask = P.batches(mg.num_slots(nu, method), lead=(tau,))
    backend = backends.make(P.module, backends.default_strategy(P.module))
    w_lib, losses = api.local_update(backend, P.params, P.X, P.Y, idx, mask, mg.MetaSpec(nu, alpha, method), beta)
    assert losses.shape == (P.B, tau)
    # manual chained loop, with the independent reference meta-gradient
    errs, loss_err, gap = [], 0.0, []
    for a in range(P.B):
        w = agent(P.params, a)
        w_unchained = dict(w)
        for t in range(tau):
            g, v = P.ref.meta_gradient(w, P.X, P.Y, idx[a, t], mask[a, t], nu, alpha, method)
            g0, _ = P.ref.meta_gradient(agent(P.params, a), P.X, P.Y, idx[a, t], mask[a, t], nu, alpha, method)
            w = axpy(-beta, g, w)
            w_unchained = axpy(-beta, g0, w_unchained)
            loss_err = max(loss_err, float((losses[a, t] - v).abs() / v.abs()))
        errs.append(rel(agent(w_lib, a), w))
        gap.append(rel(w_unchained, w))
    # manual chained loop with the library's own block meta-gradient
    wb = P.params
    for t in range(tau):
        g, _ = bmg(P, wb, idx[:, t], mask[:, t], nu, alpha, method)
        wb = axpy(-beta, g, wb)
    err_block = max(rel(agent(w_lib, a), agent(wb, a)) for a in range(P.B))
    report(f"8 local_update {method}", max_rel_err_vs_ref=max(errs), vs_block=err_block,
           loss_err=loss_err, min_gap_unchained=min(gap))
    tol = 1e-10 if method != "hf" else 1e-8
    assert max(errs) < tol
    assert err_block < 1e-13
    assert loss_err < 1e-10
    assert min(gap) > 1e-4  # chaining matters, so the comparison can tell both apart
    for a in range(P.B):
        assert rel(agent(w_lib, a), agent(P.params, a)) > 1e-3


# --------------------------------------------------------------------------- 9. Hessian points

@pytest.mark.parametrize("model,nu", [("linear", 1), ("mlp", 1), ("linear", 2)])
def test_hessians_at_theta0_to_nu_minus_1(model, nu):
    P = Problem(model, B=5, seed=9)
    alpha = 1.0  # large step: θ^1 far from θ^0, so H(θ^0) ≠ H(θ^1)
    idx, mask = P.batches(1, b=12)
    g, _ = bmg(P, P.params, idx, mask, nu, alpha, "exact")
    right, _ = P.ref.block(P, P.params, idx, mask, nu, alpha)
    wrong, _ = P.ref.block(P, P.params, idx, mask, nu, alpha, wrong_hessian_point=True)
    e_right = max_rel_agents(g, right)
    e_wrong = min(rel(agent(g, a), wrong[a]) for a in range(P.B))
    report(f"9 hessian point {model} nu={nu}", vs_correct=e_right, min_vs_wrong=e_wrong)
    assert e_right < 1e-10
    assert e_wrong > 1e-3


# --------------------------------------------------------------------------- 10. personalized

@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("chunk", [256, 2])
def test_personalized_metrics(model, chunk):
    P = Problem(model, B=3, n=60, seed=11)
    n_te = 30
    Xte = torch.randn((n_te,) + SHAPES[model], generator=P.gen, dtype=F64)
    Yte = torch.randint(0, NUM_CLASSES, (n_te,), generator=P.gen)
    ntr, nte = [10, 14, 7], [8, 5, 11]
    tr_idx = torch.randint(0, P.n, (3, max(ntr)), generator=P.gen)  # padding points at real samples
    te_idx = torch.randint(0, n_te, (3, max(nte)), generator=P.gen)
    tr_m = (torch.arange(max(ntr)) < torch.tensor(ntr)[:, None]).to(F64)
    te_m = (torch.arange(max(nte)) < torch.tensor(nte)[:, None]).to(F64)
    w = agent(P.params, 0)
    ks, alpha = [0, 1, 3], 0.5
    losses, accs = api.personalized_metrics(backends.make(P.module, "stacked"), w, mg.Split(P.X, P.Y, tr_idx, tr_m),
                                           mg.Split(Xte, Yte, te_idx, te_m), ks, alpha, chunk=chunk)
    assert losses.shape == accs.shape == (3, len(ks))
    ref = P.ref
    el, ea = 0.0, 0.0
    for a in range(3):
        x, y = P.X[tr_idx[a, : ntr[a]]], P.Y[tr_idx[a, : ntr[a]]]
        xt, yt = Xte[te_idx[a, : nte[a]]], Yte[te_idx[a, : nte[a]]]
        ones = torch.ones(ntr[a], dtype=F64)
        thetas = ref.inner(w, [(x, y, ones)] * max(ks), alpha)
        for j, k in enumerate(ks):
            ref.load(thetas[k])
            with torch.no_grad():
                out = ref.m(xt)
                l_ref = torch.nn.functional.cross_entropy(out, yt)
                a_ref = (out.argmax(-1) == yt).double().mean()
            el = max(el, float((losses[a, j] - l_ref).abs() / l_ref))
            ea = max(ea, float((accs[a, j] - a_ref).abs()))
        # k = 0: the global model's own accuracy on this agent's test samples
        ref.load(w)
        with torch.no_grad():
            glob = (ref.m(xt).argmax(-1) == yt).double().mean()
        assert float((accs[a, 0] - glob).abs()) < 1e-14
    report(f"10 personalized {model} chunk={chunk}", loss_rel_err=el, acc_abs_err=ea)
    assert el < 1e-10 and ea < 1e-12
    assert not torch.allclose(losses[:, 0], losses[:, 2])  # fine-tuning did something


@pytest.mark.parametrize("method", ["exact", "hf"])
@pytest.mark.parametrize("nu", [1, 3])
def test_recompute_gives_the_same_meta_gradient(method, nu):
    """train.recompute: iterates recomputed in the backward pass instead of stored — same numbers."""
    torch.manual_seed(3)
    model = build_model("mlp", (1, 8, 8), 10, (12,)).double()
    backend = backends.make(model, "stacked")
    p = {k: v.detach() for k, v in model.named_parameters()}
    B = 4
    stacked = {k: v.unsqueeze(0).repeat(B, *[1] * v.dim()) + 0.05 * torch.randn(B, *v.shape, dtype=v.dtype)
               for k, v in p.items()}
    X, Y = torch.randn(60, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (60,))
    S = mg.num_slots(nu, method)
    idx, mask = torch.randint(0, 60, (B, S, 8)), torch.ones(B, S, 8, dtype=torch.float64)
    stored, v1 = api.block_meta_gradients(backend, stacked, X, Y, idx, mask, mg.MetaSpec(nu, 0.1, method))
    again, v2 = api.block_meta_gradients(backend, stacked, X, Y, idx, mask, mg.MetaSpec(nu, 0.1, method, recompute=True))
    assert torch.equal(v1, v2)
    for k in stored:
        torch.testing.assert_close(again[k], stored[k], rtol=1e-13, atol=1e-15)

"""The ``stacked`` backend (and every other backend) against the vmap backend and the independent
per-agent reference (metagrad.agent_meta_gradient_autograd: plain torch.autograd, one agent at a
time, written apart from the block recursion), float64, for every flavour, ν ∈ {0, 1, 2, 5},
τ > 1, recompute on/off, padded masks and all three built-in models.
"""

from __future__ import annotations

import pytest
import torch

from mpifedmeta.engine import backends
from mpifedmeta.core import metagrad as mg
from mpifedmeta.core import reference as ref
import engine_api as api
from mpifedmeta.models.lift import lift
from mpifedmeta.models import build_model, param_dict

F64 = torch.float64
SHAPES = {"linear": (6,), "mlp": (1, 4, 4), "cnn": (1, 6, 6)}
HIDDEN = {"linear": None, "mlp": (9, 7), "cnn": (8,)}
NUM_CLASSES = 3
TOL = 1e-12


@pytest.fixture(autouse=True)
def _seeded():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        yield


def block(name: str, B: int = 4, n: int = 30, dtype=F64):
    model = build_model(name, SHAPES[name], NUM_CLASSES, HIDDEN[name]).to(dtype)
    model.requires_grad_(False)
    params = {k: v.unsqueeze(0).expand((B,) + v.shape).clone() + 0.2 * v.abs().mean().clamp_min(1e-2)
              * torch.randn((B,) + v.shape, dtype=dtype) for k, v in param_dict(model).items()}
    X = torch.randn((n,) + SHAPES[name], dtype=dtype)
    Y = torch.randint(0, NUM_CLASSES, (n,))
    return model, params, X, Y


def batches(B, lead, slots, b, n, padded: bool, dtype=F64):
    shape = (B,) + lead + (slots, b)
    idx = torch.randint(0, n, shape)
    mask = torch.ones(shape, dtype=dtype)
    if padded:   # every agent a different number of real samples, the rest padding
        real = torch.randint(b // 2, b + 1, shape[:-1])
        real.view(B, -1)[:, 0] = torch.arange(B) % (b // 2) + b // 2
        mask = (torch.arange(b) < real.unsqueeze(-1)).to(dtype)
        assert (mask == 0).any()
    return idx, mask


def full_batches(B, tau, n, dtype=F64):
    """'full' batches: one slot per agent, different sample counts, padded, the same in every step."""
    width = n // B
    counts = torch.tensor([width - a for a in range(B)])
    rows = torch.arange(B).view(B, 1) * width + torch.arange(width)
    mask = (torch.arange(width) < counts.view(B, 1)).to(dtype)
    rows = torch.where(mask.bool(), rows, rows[:, :1])
    shape = (B, tau, 1, width)
    return rows[:, None, None].expand(shape), mask[:, None, None].expand(shape)


def rel(a: dict, b: dict) -> float:
    fa = torch.cat([v.reshape(-1) for v in a.values()])
    fb = torch.cat([v.reshape(-1) for v in b.values()])
    return float((fa - fb).norm() / fb.norm())


def per_agent(p: dict, a: int) -> dict:
    return {k: v[a] for k, v in p.items()}


def reference_block(model, params, X, Y, idx, mask, meta: mg.MetaSpec):
    loss = ref.make_loss(model)
    out = [ref.agent_meta_gradient_autograd(loss, per_agent(params, a), X, Y, idx[a], mask[a], meta.nu, meta.alpha,
                                           meta.method, meta.delta) for a in range(idx.shape[0])]
    return [g for g, _ in out], torch.stack([v for _, v in out])


def reference_round(model, params, X, Y, idx, mask, meta: mg.MetaSpec, beta: float):
    loss = ref.make_loss(model)
    finals, losses = [], []
    for a in range(idx.shape[0]):
        w, ls = per_agent(params, a), []
        for t in range(idx.shape[1]):
            g, v = ref.agent_meta_gradient_autograd(loss, w, X, Y, idx[a, t], mask[a, t], meta.nu, meta.alpha,
                                                   meta.method, meta.delta)
            w = {k: w[k] - beta * g[k] for k in w}
            ls.append(v)
        finals.append(w)
        losses.append(torch.stack(ls))
    return finals, torch.stack(losses)


CASES = [(m, method, nu) for m in ("linear", "mlp", "cnn") for method in mg.METHODS for nu in (0, 1, 2, 5)
         if not (m == "cnn" and nu == 5 and method != "exact")]


@pytest.mark.parametrize("model_name,method,nu", CASES)
def test_block_meta_gradients_equal_vmap_and_reference(model_name, method, nu):
    model, params, X, Y = block(model_name)
    idx, mask = batches(4, (), mg.num_slots(nu, method), 8, len(X), padded=True)
    meta = mg.MetaSpec(nu, 0.1, method, 1e-2)
    ref, ref_v = reference_block(model, params, X, Y, idx, mask, meta)
    outs = {s: api.block_meta_gradients(backends.make(model, s, chunk=3), params, X, Y, idx, mask, meta)
            for s in backends.BACKENDS}
    for s, (g, v) in outs.items():
        assert set(g) == set(params) and all(g[k].shape == params[k].shape for k in g)
        err = max(rel(per_agent(g, a), ref[a]) for a in range(4))
        assert err <= TOL, (s, err)
        assert float(((v - ref_v).abs() / ref_v.abs()).max()) <= TOL, s
    err_vmap = max(rel(per_agent(outs["stacked"][0], a), per_agent(outs["vmap"][0], a)) for a in range(4))
    assert err_vmap <= TOL
    # not vacuous: the agents differ
    assert rel(per_agent(outs["stacked"][0], 0), per_agent(outs["stacked"][0], 1)) > 1e-3


@pytest.mark.parametrize("model_name", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("method", mg.METHODS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("full", [False, True], ids=["sampled", "full-padded"])
def test_local_round_equals_vmap_and_reference(model_name, method, recompute, full):
    nu, tau, beta = 2, 3, 0.3
    model, params, X, Y = block(model_name, n=32)
    if full:
        idx, mask = full_batches(4, tau, len(X))
    else:
        idx, mask = batches(4, (tau,), mg.num_slots(nu, method), 8, len(X), padded=True)
    meta = mg.MetaSpec(nu, 0.1, method, 1e-2, recompute)
    ref_w, ref_l = reference_round(model, params, X, Y, idx, mask, meta, beta)
    results = {}
    for s in ("stacked", "vmap", "loop"):
        w, losses = api.local_update(backends.make(model, s), params, X, Y, idx, mask, meta, beta)
        assert losses.shape == (4, tau)
        moved = [{k: w[k][a] - params[k][a] for k in w} for a in range(4)]
        ref_moved = [{k: ref_w[a][k] - params[k][a] for k in w} for a in range(4)]
        err = max(rel(moved[a], ref_moved[a]) for a in range(4))
        assert err <= TOL, (s, err)
        assert float(((losses - ref_l).abs() / ref_l.abs()).max()) <= TOL, s
        results[s] = moved
    assert max(rel(results["stacked"][a], results["vmap"][a]) for a in range(4)) <= TOL


def test_float32_stacked_close_to_float64_reference():
    model, params, X, Y = block("mlp", dtype=torch.float32)
    idx, mask = batches(4, (), mg.num_slots(2, "exact"), 8, len(X), padded=True, dtype=torch.float32)
    meta = mg.MetaSpec(2, 0.1, "exact")
    g, _ = api.block_meta_gradients(backends.make(model, "stacked"), params, X, Y, idx, mask, meta)
    m64 = build_model("mlp", SHAPES["mlp"], NUM_CLASSES, HIDDEN["mlp"]).double()
    ref, _ = reference_block(m64, {k: v.double() for k, v in params.items()}, X.double(), Y, idx, mask.double(), meta)
    assert all(v.dtype == torch.float32 for v in g.values())
    assert max(rel({k: v[a].double() for k, v in g.items()}, ref[a]) for a in range(4)) < 1e-5


def test_stacked_forward_keeps_the_global_names_and_logits():
    for name in ("linear", "mlp", "cnn"):
        model, params, X, _ = block(name)
        fwd = lift(model).forward
        assert fwd is not None and backends.default_strategy(model) == "stacked"
        x = X[:20].reshape((4, 5) + X.shape[1:])
        out = fwd(params, x)
        for a in range(4):
            single = torch.func.functional_call(model, per_agent(params, a), (x[a],))
            torch.testing.assert_close(out[a], single, rtol=1e-13, atol=1e-13)


class _Sorted(torch.nn.Module):
    """A model whose stacked form cannot be derived (torch.sort has no lifter)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.sort(x.flatten(1), dim=1).values)


def test_model_without_stacked_form_uses_vmap_and_stacked_is_refused():
    model = _Sorted()
    assert lift(model).forward is None and backends.default_strategy(model) == "vmap"
    assert backends.resolve("stacked", model) == ("vmap", "vmap (stacked form not derivable: torch.sort at node 'sort')")
    assert backends.resolve("loop", model) == ("loop", "loop")
    with pytest.raises(ValueError, match="no stacked form of _Sorted .torch.sort at node 'sort'.; use vmap"):
        backends.make(model, "stacked")

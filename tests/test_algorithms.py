"""The plug-in algorithms (pfedme, ditto, fedrep, the FedProx example) and the server optimizers against
the independent float64 per-agent references of tests/algorithm_reference.py, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import algorithm_reference as ar
from mpifedmeta import algorithms
from mpifedmeta.algorithms.base import Train
from mpifedmeta.core.layout import ParamLayout
from mpifedmeta.engine import backends, compiled
from mpifedmeta.federation import algorithm as fa
from mpifedmeta.federation import server

COUNTS = (6, 4, 5)          # samples per agent (padded to the widest, mask 0)
WIDTH = max(COUNTS)
TRAIN = Train(local_steps=3, beta=0.3)
STRATEGIES = ("stacked", "vmap", "loop")
TOL = dict(rtol=1e-10, atol=1e-12)


def make_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(sum(COUNTS), 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (sum(COUNTS),))
    offsets = np.concatenate([[0], np.cumsum(COUNTS)[:-1]])
    return model, X, Y, offsets


def full_batches(offsets, steps: int, slots: int):
    idx = torch.tensor([[o + min(j, c - 1) for j in range(WIDTH)] for o, c in zip(offsets, COUNTS)])
    mask = torch.tensor([[1.0 if j < c else 0.0 for j in range(WIDTH)] for c in COUNTS], dtype=torch.float64)
    shape = (len(COUNTS), steps, slots, WIDTH)
    return idx[:, None, None, :].expand(shape), mask[:, None, None, :].expand(shape)


def random_batches(offsets, steps: int, slots: int, b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.randint(0, c, (steps, slots, b), generator=g) for c in COUNTS])
    idx = pos + torch.as_tensor(offsets).view(-1, 1, 1, 1)
    return idx, torch.ones(idx.shape, dtype=torch.float64)


def agent_data(X, Y, offsets, a):
    return X[offsets[a]:offsets[a] + COUNTS[a]], Y[offsets[a]:offsets[a] + COUNTS[a]]


def ref_batches(X, Y, idx, a, kinds):
    """The reference's batch(kind, t) over the engine's idx: ``kinds`` maps a kind to its slot."""
    return lambda kind, t: (X[idx[a, t, kinds[kind]]], Y[idx[a, t, kinds[kind]]])


def run_engine(algo, model, strategy, X, Y, idx, mask, state=None):
    layout = ParamLayout.of(dict(model.named_parameters()))
    algo = algo.prepare(model, layout)
    backend = backends.make(model, strategy)
    w = layout.flatten({k: v.detach() for k, v in model.named_parameters()})
    theta = w.expand(len(COUNTS), -1).clone()
    if algo.stateful and state is None:
        state = fa.initial_state(algo, layout, w).expand(len(COUNTS), -1).clone()
    theta, losses, state = compiled.run("off", algo, backend, theta, state, w, X, Y, idx, mask)
    fa._restore_unshared(algo, layout, theta, w)
    return layout, algo, backend, w, theta, losses, state


def as_dict(layout, flat_row):
    return {k: v.clone() for k, v in layout.split(flat_row).items()}


def assert_close(got: dict, want: dict, what: str):
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{what} {k}: {m}")


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_pfedme_matches_the_per_agent_reference(strategy, stochastic):
    model, X, Y, off = make_problem()
    algo = algorithms.make({"name": "pfedme", "lam": 2.0, "inner_steps": 3, "inner_lr": 0.2}, vars(TRAIN))
    idx, mask = (random_batches if stochastic else full_batches)(off, algo.steps, algo.slots)
    layout, algo, backend, w, theta, losses, _ = run_engine(algo, model, strategy, X, Y, idx, mask)
    assert losses.shape == (len(COUNTS), TRAIN.local_steps)
    for a in range(len(COUNTS)):
        x, y = agent_data(X, Y, off, a)
        want = ar.pfedme_local(model, params(model), x, y, TRAIN.local_steps, TRAIN.beta, 2.0, 3, 0.2,
                               batches=ref_batches(X, Y, idx, a, {"inner": 0}) if stochastic else None)
        assert_close(as_dict(layout, theta[a]), want, f"pfedme agent {a}")
    full_idx, full_mask = full_batches(off, 1, 1)
    pers = algo.personalize(backend, w, None, None, X[full_idx[:, 0, 0]], Y[full_idx[:, 0, 0]], full_mask[:, 0, 0])
    for a in range(len(COUNTS)):
        x, y = agent_data(X, Y, off, a)
        assert_close(as_dict(layout, pers[a]), ar.pfedme_personal(model, params(model), x, y, 2.0, 3, 0.2),
                     f"pfedme personalized agent {a}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_ditto_matches_the_per_agent_reference_with_stored_personal_models(strategy, stochastic):
    model, X, Y, off = make_problem()
    algo = algorithms.make({"name": "ditto", "lam": 0.5, "personal_steps": 4, "personal_lr": 0.2}, vars(TRAIN))
    layout = ParamLayout.of(dict(model.named_parameters()))
    w = layout.flatten(params(model))
    stored = w.expand(len(COUNTS), -1).clone()
    stored[0] += 0.1 * torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    idx, mask = (random_batches if stochastic else full_batches)(off, algo.steps, algo.slots)
    layout, algo, backend, w, theta, _, state = run_engine(algo, model, strategy, X, Y, idx, mask, stored.clone())
    for a in range(len(COUNTS)):
        x, y = agent_data(X, Y, off, a)
        b = ref_batches(X, Y, idx, a, {"local": 0, "personal": 1}) if stochastic else None
        want_w, want_v = ar.ditto_local(model, params(model), as_dict(layout, stored[a]), x, y, TRAIN.local_steps,
                                        TRAIN.beta, 0.5, 4, 0.2, batches=b)
        assert_close(as_dict(layout, theta[a]), want_w, f"ditto upload agent {a}")
        assert_close(as_dict(layout, state[a]), want_v, f"ditto personal model agent {a}")
    # the personalized model: the stored v_i, else s full-batch steps from w
    full_idx, full_mask = full_batches(off, 1, 1)
    has = torch.tensor([True, False, True])
    pers = algo.personalize(backend, w, state, has, X[full_idx[:, 0, 0]], Y[full_idx[:, 0, 0]], full_mask[:, 0, 0])
    for a in range(len(COUNTS)):
        x, y = agent_data(X, Y, off, a)
        want = ar.ditto_personal(model, params(model), as_dict(layout, state[a]) if has[a] else None, x, y, 0.5, 4, 0.2)
        assert_close(as_dict(layout, pers[a]), want, f"ditto personalized agent {a}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_fedrep_matches_the_per_agent_reference_and_shares_the_body_only(strategy, stochastic):
    model, X, Y, off = make_problem()
    algo = algorithms.make({"name": "fedrep", "head": None, "head_steps": 2, "head_lr": 0.4}, vars(TRAIN))
    layout = ParamLayout.of(dict(model.named_parameters()))
    head = ("2.weight", "2.bias")                      # the default: the model's last layer
    w = layout.flatten(params(model))
    bound = algo.prepare(model, layout)
    assert [layout.names[i] for i in bound.head_index] == list(head)
    stored = fa.initial_state(bound, layout, w).expand(len(COUNTS), -1).clone()
    stored[1] += 0.2
    idx, mask = (random_batches if stochastic else full_batches)(off, algo.steps, algo.slots)
    layout, algo, backend, w, theta, _, state = run_engine(algo, model, strategy, X, Y, idx, mask, stored.clone())
    for a in range(len(COUNTS)):
        x, y = agent_data(X, Y, off, a)
        h = dict(zip(head, [t.reshape(s) for t, s in zip(stored[a].split([21, 3]), [(3, 7), (3,)])]))
        b = ref_batches(X, Y, idx, a, {"head": 0, "body": 1}) if stochastic else None
        up, want_h = ar.fedrep_local(model, params(model), set(head), h, x, y, TRAIN.local_steps, TRAIN.beta, 2, 0.4,
                                     batches=b)
        assert_close(as_dict(layout, theta[a]), up, f"fedrep upload agent {a}")
        got_h = dict(zip(head, [t.reshape(s) for t, s in zip(state[a].split([21, 3]), [(3, 7), (3,)])]))
        assert_close(got_h, want_h, f"fedrep head agent {a}")
        for n in head:                                  # the upload's head is the global one: nothing shared
            assert torch.equal(as_dict(layout, theta[a])[n], params(model)[n])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_fedprox_example_from_its_file_matches_the_reference(strategy, repo_root):
    import os
    spec = os.path.join(repo_root, "examples", "fedprox.py") + ":build"
    section = algorithms.check_section({"name": spec, "mu": 0.5}, {**vars(TRAIN), "dtype": "float64"})
    assert section == {"name": spec, "mu": 0.5}
    model, X, Y, off = make_problem()
    algo = algorithms.make(section, vars(TRAIN))
    idx, mask = random_batches(off, algo.steps, algo.slots)
    layout, _, _, _, theta, _, _ = run_engine(algo, model, strategy, X, Y, idx, mask)
    for a in range(len(COUNTS)):
        x, y = agent_data(X, Y, off, a)
        want = ar.fedprox_local(model, params(model), x, y, TRAIN.local_steps, TRAIN.beta, 0.5,
                                batches=ref_batches(X, Y, idx, a, {"local": 0}))
        assert_close(as_dict(layout, theta[a]), want, f"fedprox agent {a}")


@pytest.mark.parametrize("optimizer", server.OPTIMIZERS)
def test_server_optimizers_match_the_reference_over_rounds(optimizer):
    rng = np.random.default_rng(0)
    d, spec = 50, server.ServerSpec(optimizer, lr=0.7, momentum=0.8, beta1=0.85, beta2=0.95, eps=1e-3)
    w = rng.normal(size=d)
    state, ref_w, ref_state = server.initial_state(spec, d), w.copy(), None
    for _ in range(4):
        deltas, c = rng.normal(size=(5, d)) * 0.1, rng.integers(1, 4, size=5)
        delta = (c[:, None] * deltas).sum(0) / c.sum()
        w, state = server.step(spec, w, delta, state)
        ref_w, ref_state = ar.server_step(ref_w, deltas, c, optimizer, ref_state, lr=0.7, momentum=0.8, beta1=0.85,
                                          beta2=0.95, eps=1e-3)
        np.testing.assert_allclose(w, ref_w, rtol=1e-12, atol=1e-14)
        for k in state:
            np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-12, atol=1e-14)


def test_sgd_with_lr_1_is_the_plain_average_bit_for_bit():
    rng = np.random.default_rng(1)
    w, delta = rng.normal(size=20), rng.normal(size=20)
    new, _ = server.step(server.ServerSpec(), w, delta, {})
    assert np.array_equal(new, w + delta)


@pytest.mark.parametrize("section, problem", [
    ({"name": "pfedme", "lam": -1.0}, "algorithm.lam = -1.0: must be > 0"),
    ({"name": "pfedme", "inner_steps": 1.5}, "algorithm.inner_steps = 1.5: must be of type int"),
    ({"name": "ditto", "personal_steps": 0}, "algorithm.personal_steps = 0: must be > 0"),
    ({"name": "ditto", "mu": 1.0}, "unknown key algorithm.mu for algorithm 'ditto' (valid: name, lam, personal_steps, personal_lr)"),
    ({"name": "fedrep", "head": "fc"}, "algorithm.head = 'fc': must be of type list"),
    ({"name": "fedrep", "head": []}, "algorithm.head = []: must be a non-empty list of parameter-name prefixes"),
    ({"name": "nope"}, "algorithm.name = 'nope': must be one of meta, pfedme, ditto, fedrep or FILE.py:NAME"),
])
def test_bad_algorithm_keys_are_one_line_naming_the_key(section, problem):
    from mpifedmeta.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        algorithms.check_section(section, {**vars(TRAIN)})
    assert str(e.value) == problem


def test_keys_come_from_the_factory_signature_with_defaults_and_docs():
    keys = algorithms.keys(algorithms.ALGORITHMS["ditto"])
    assert list(keys) == ["lam", "personal_steps", "personal_lr"]
    assert keys["lam"][0] == 0.1 and float in keys["lam"][1] and "λ" in keys["lam"][2]
    assert keys["personal_steps"][0] is None and keys["personal_steps"][1] == (int,)
    assert algorithms.keys(algorithms.ALGORITHMS["meta"]) == {}
    resolved = algorithms.check_section({"name": "ditto"}, vars(TRAIN))
    assert resolved == {"name": "ditto", "lam": 0.1, "personal_steps": None, "personal_lr": None}
    algo = algorithms.make(resolved, vars(TRAIN))
    assert (algo.personal_steps, algo.personal_lr) == (TRAIN.local_steps, TRAIN.beta)


def test_one_step_variant_keeps_everything_but_the_step_counts():
    algo = algorithms.make({"name": "ditto", "lam": 0.5, "personal_steps": 7, "personal_lr": None}, vars(TRAIN))
    one = algo.one_step()
    assert (one.tau, one.personal_steps, one.lam) == (1, 1, 0.5)
    assert algorithms.make({"name": "pfedme"}, vars(TRAIN)).one_step().inner_steps == 5


def test_the_memory_budget_counts_per_agent_state_and_names_the_algorithm(monkeypatch):
    import torch as t
    from mpifedmeta.errors import ConfigError
    from mpifedmeta.run import budget
    from mpifedmeta.run.config import validate
    cfg = validate({"algorithm": {"name": "ditto"}, "data": {"num_agents": 10000}, "train": {"agents_per_round": 10}})
    algo = algorithms.make(cfg.algorithm.values, cfg.train.values)
    d = 10**5
    needs = budget.round_needs(cfg, 2, d, 64, 50000, 4, algo, d)
    state = [n for n in needs if "per-agent state" in n[2]]
    assert state and state[0][0] == 5000 * d * 4 and state[0][1][0] == "algorithm.name"
    gathered = [n for n in needs if "gathered for a checkpoint" in n[2]]
    assert gathered and gathered[0][0] >= 10000 * d * 4
    assert not [n for n in budget.round_needs(cfg, 2, d, 64, 50000, 4, algo, 0) if "state" in n[2]]
    monkeypatch.setattr(budget, "available_bytes", lambda device, ranks=1: 10**9)     # 1 GB: the state is 2 GB
    with pytest.raises(ConfigError) as e:
        budget.check_run(cfg, 2, (64,), d, 4, t.device("cpu"), algo=algo, state_numel=d)
    assert str(e.value).startswith("data.num_agents = 10000: the per-agent state of algorithm 'ditto' (5000 agents x "
                                   "100000 values) need at least 1.86 GB per rank")
    budget.check_run(cfg, 2, (64,), d, 4, t.device("cpu"), algo=algo, state_numel=0)      # stateless: fits

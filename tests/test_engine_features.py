"""Engine features beyond the core loop: auto strategy, stationarity diagnostics, sweeps, seed tables."""

import os
import subprocess

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpifedmeta.core import metagrad, reference
from mpifedmeta.engine import compiled as compiled_rounds
from mpifedmeta.run import config, session, start, sweep
from mpifedmeta.storage import metrics
from mpifedmeta.parallel.dist import World
from mpifedmeta.report import experiment_groups, load_run, make_report

TINY = ["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=4", "train.local_steps=2",
        "train.rounds=3", "eval.every=3", "model.hidden=[16]", "eval.finetune_steps=[0,1]",
        f'train.device="{os.environ.get("MPIFEDMETA_TEST_DEVICE", "cpu")}"']


def serial_world():
    return World(MPI.COMM_SELF, 0, 1, 0, 1)


def run_inprocess(tmp_path, name, extra):
    out = str(tmp_path / name)
    cfg = config.load(None, TINY + extra + [f'output.dir="{out}"'])
    assert start.start_new(cfg, serial_world()) == 0
    return out


def final_model(out):
    path = sorted(os.listdir(os.path.join(out, "checkpoints")))[-1]
    with h5py.File(os.path.join(out, "checkpoints", path), "r") as f:
        return {k: v[()] for k, v in f["model"].items()}, dict(f.attrs)


def test_auto_strategy_is_recorded_and_reused_on_resume(tmp_path):
    out = run_inprocess(tmp_path, "auto", ["train.strategy=auto"])
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        chosen = f.attrs["strategy"]
        assert f.attrs["strategy_setting"] == "auto"
    assert chosen in ("stacked", "vmap", "chunked", "loop")
    _, attrs = final_model(out)
    assert attrs["strategy"] == chosen
    # a resumed auto run continues with the recorded strategy, bit for bit
    assert start.resume(out, serial_world(), 5) == 0
    resumed, _ = final_model(out)
    ref = run_inprocess(tmp_path, "ref", ["train.strategy=" + str(chosen), "train.rounds=5"])
    expected, _ = final_model(ref)
    assert all(np.array_equal(resumed[k], expected[k]) for k in expected)


def test_strategies_give_the_same_training_run(tmp_path):
    models = {s: final_model(run_inprocess(tmp_path, s, [f"train.strategy={s}", "train.chunk=2", "train.dtype=float64"]))[0]
              for s in ("stacked", "vmap", "chunked", "loop")}
    for s in ("stacked", "chunked", "loop"):
        for k in models["vmap"]:
            np.testing.assert_allclose(models[s][k], models["vmap"][k], rtol=1e-10, atol=1e-12)


def test_stationarity_matches_a_direct_per_agent_computation(tmp_path):
    out = run_inprocess(tmp_path, "stat", ["eval.stationarity=true", "train.dtype=float64", "model.name=linear",
                                           "train.nu=2", "train.alpha=0.3"])
    cfg = config.load(None, TINY + ["train.dtype=float64", "model.name=linear", "train.nu=2", "train.alpha=0.3"])
    s = session.setup(cfg, serial_world())
    params, _ = final_model(out)
    blk = s.round.agents.block
    params = {k: torch.as_tensor(v, device=blk.device) for k, v in params.items()}
    grads, values = [], []
    for a in range(s.num_train):      # per-agent loop with plain autograd on the full training split
        rows = torch.arange(int(blk.train_offset[a]), int(blk.train_offset[a] + blk.train_count[a]), device=blk.device)
        idx = rows.view(1, -1)
        mask = torch.ones(1, len(rows), dtype=torch.float64, device=blk.device)
        g, v = reference.agent_meta_gradient_autograd(reference.make_loss(s.model), params, blk.X_train, blk.Y_train,
                                                      idx, mask, 2, 0.3, "exact")
        grads.append(torch.cat([t.reshape(-1) for t in g.values()]))
        values.append(float(v))
    full = torch.stack(grads).mean(0).cpu()
    run = metrics.read(out)
    gn, F = run.grad_norm_sq[-1], run.meta_loss_full[-1]
    assert np.isfinite(run.grad_norm_sq).all()
    assert gn == pytest.approx(float(full @ full), rel=1e-9)
    assert F == pytest.approx(np.mean(values), rel=1e-12)


def test_no_holdout_agents(tmp_path):
    out = run_inprocess(tmp_path, "noho", ["data.holdout_agents=0"])
    ev = metrics.read(out, tables=True).tables["eval"]
    assert ev["holdout_agent_acc"].shape == (2, 2, 0)
    assert np.isnan(ev["holdout_acc_mean"]).all()


def test_sweep_plan_names_and_values():
    todo = sweep.plan("OUT", ["train.nu=0,1", "model.hidden=[8,4],[16]", "train.metagrad=exact"])
    assert [d for d, _ in todo] == ["OUT/nu=0_hidden=8,4_metagrad=exact", "OUT/nu=0_hidden=16_metagrad=exact",
                                    "OUT/nu=1_hidden=8,4_metagrad=exact", "OUT/nu=1_hidden=16_metagrad=exact"]
    assert todo[1][1] == ["train.nu=0", "model.hidden=[16]", "train.metagrad=exact"]
    with pytest.raises(config.ConfigError, match="train.nux"):
        sweep.plan("OUT", ["train.nux=1,2"])


def test_sweep_cli_runs_each_point_once_and_report_aggregates_seeds(tmp_path, cli_env):
    out = str(tmp_path / "sw")
    cmd = ["mpifedmeta", "sweep", "configs/quickstart.toml", "--grid", "train.nu=0,1", "--grid", "train.seed=0,1",
           "--out", out] + [a for t in TINY for a in ("--set", t)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(cmd, cwd=repo, env=cli_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["nu=0_seed=0", "nu=0_seed=1", "nu=1_seed=0", "nu=1_seed=1"]
    again = subprocess.run(cmd + ["--task", "3"], cwd=repo, env=cli_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already complete" in again.stdout
    bad = subprocess.run(cmd + ["--task", "9"], cwd=repo, env=cli_env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--task 9" in bad.stderr
    runs = [load_run(os.path.join(out, d)) for d in sorted(os.listdir(out))]
    groups = experiment_groups(runs)
    assert [(label, len(m)) for label, m in groups] == [("nu=0", 2), ("nu=1", 2)]
    paths = make_report([os.path.join(out, d) for d in sorted(os.listdir(out))], str(tmp_path / "rep"))
    text = open(paths[-1]).read()
    assert "## Aggregated over seeds" in text and "| nu=1 | 2 |" in text
    acc = [r.train_acc_mean[-1, 1] for r in runs[2:]]
    assert f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc):.1f}" in text


@pytest.mark.parametrize("model_name", ["linear", "cnn"])
def test_compile_option_matches_eager_or_falls_back(model_name):
    """train.compile gives the eager numbers, exact HVPs included (the CNN's lifted layout
    conversions are autograd functions, which torch.compile miscompiles in double backward)."""
    torch.manual_seed(0)
    from mpifedmeta.models import build_model, param_dict
    shape = (6,) if model_name == "linear" else (1, 6, 6)
    model = build_model(model_name, shape, 3, None if model_name == "linear" else [5]).double()
    from mpifedmeta.engine import backends
    backend = backends.make(model, "stacked")
    p = param_dict(model)
    B = 3
    stacked = {k: v.unsqueeze(0).repeat(B, *[1] * v.dim()) + 0.01 * torch.randn(B, *v.shape, dtype=v.dtype)
               for k, v in p.items()}
    X, Y = torch.randn((40,) + shape, dtype=torch.float64), torch.randint(0, 3, (40,))
    for method in ("fo", "exact"):
        S = metagrad.num_slots(1, method)
        idx, mask = torch.randint(0, 40, (B, S, 8)), torch.ones(B, S, 8, dtype=torch.float64)
        idx, mask = idx[:, None].expand(B, 2, S, 8), mask[:, None].expand(B, 2, S, 8)   # τ = 2
        meta = metagrad.MetaSpec(1, 0.1, method)
        start = backend.layout.flatten(stacked, 1)
        eager, _ = metagrad.local_update(backend, start.clone(), X, Y, idx, mask, meta, 0.5)
        compiled, _ = compiled_rounds.local_update("compile", backend, start.clone(), X, Y, idx, mask, meta, 0.5)
        assert not torch.equal(eager, start)
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("limit", [0, 1 << 40])
def test_local_round_gathered_at_once_or_step_by_step_gives_the_same_bits(monkeypatch, limit):
    """metagrad.round_steps gathers a whole local round in one call below ROUND_GATHER_BYTES, else per step:
    the same samples either way, so the same local models bit for bit."""
    from mpifedmeta.models import build_model, param_dict
    from mpifedmeta.engine import backends
    torch.manual_seed(0)
    model = build_model("mlp", (6,), 3, [5])
    backend = backends.make(model, "stacked")
    B, tau, S = 4, 3, metagrad.num_slots(2, "exact")
    start = backend.layout.flatten({k: v.unsqueeze(0).repeat(B, *[1] * v.dim()) for k, v in param_dict(model).items()}, 1)
    X, Y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    idx, mask = torch.randint(0, 50, (B, tau, S, 8)), torch.ones(B, tau, S, 8)
    meta = metagrad.MetaSpec(2, 0.1, "exact")
    reference_models, reference_losses = metagrad.local_update(backend, start.clone(), X, Y, idx, mask, meta, 0.5)
    monkeypatch.setattr(metagrad, "ROUND_GATHER_BYTES", limit)
    models, losses = metagrad.local_update(backend, start.clone(), X, Y, idx, mask, meta, 0.5)
    assert torch.equal(models, reference_models) and torch.equal(losses, reference_losses)
    assert not torch.equal(models, start)


def test_strategy_pick_prefers_vmap_within_the_noise_margin():
    from mpifedmeta.engine.strategy import pick
    assert pick({"vmap": 1.0, "loop": 0.98, "chunked": 0.99}) == "vmap"      # within 3%: the default
    assert pick({"vmap": 1.0, "loop": 0.95}) == "loop"                         # else the fastest
    assert pick({"stacked": 1.0, "loop": 0.9, "vmap": 0.95}) == "loop"
    assert pick({"loop": 2.0, "chunked": 1.0}) == "chunked"


def test_agent_chunk_auto_is_timed_on_cpu_recorded_and_reused(tmp_path):
    """train.agent_chunk = "auto" on the CPU times chunk sizes at start-up (the start-up line shows
    the timings), records the choice, and a resume keeps it; an integer is used as is."""
    from mpifedmeta.engine import strategy
    cfg = config.load(None, TINY + ["train.agents_per_round=10", 'output.dir="/nonexistent/x"'])
    s = session.setup(cfg, serial_world())
    assert s.round.spec.agent_chunk in (0,) + strategy.CHUNK_SIZES
    assert "auto, timed 0 / " in s.agent_chunk_line and " ms)" in s.agent_chunk_line
    again = session.setup(cfg, serial_world(), {"strategy": s.strategy, "agent_chunk": 4})
    assert again.round.spec.agent_chunk == 4 and "recorded" in again.agent_chunk_line
    fixed = session.setup(config.load(None, TINY + ["train.agent_chunk=3", 'output.dir="/nonexistent/x"']),
                          serial_world())
    assert fixed.round.spec.agent_chunk == 3 and fixed.agent_chunk_line == "3"
    out = run_inprocess(tmp_path, "chunk", ["train.agent_chunk=2"])
    _, attrs = final_model(out)
    assert attrs["agent_chunk"] == 2

"""Generated populations (issue 14): FedProx Synthetic(α, β) and virtual agents over a real dataset.

The generator is checked against the FedProx definition (statistics over many agents), agents are
pure functions of (seed, agent id), a run's results do not depend on the number of ranks, and the
work of a round follows the cohort, not the population size N.
"""

import os
import tracemalloc

import h5py
import numpy as np
import pytest
import torch

from helpers import (local_round_array, assert_models_identical, assert_one_error_line, arrays_identical, checkpoint_rounds, describe,
                     final_model, read_metrics, run_cli, sets, write_tiny_config)
from mpifedmeta.core import rng
from mpifedmeta.federation import block, population
from mpifedmeta.data import load_dataset
from mpifedmeta.data import synthetic as S
from mpifedmeta.data import virtual as V

SPEC = S.SyntheticSpec(alpha=1.0, beta=1.0, iid=False, max_samples=1000, seed=3)


# --------------------------------------------------------------------------- generator: determinism

def test_agent_data_is_a_pure_function_of_seed_and_agent():
    x1, y1 = S.agent_samples(SPEC, 12345)
    alone = S.generate(SPEC, np.array([12345]))[0]
    among = S.generate(SPEC, np.array([7, 12345, 999_999]))[1]
    for x, y in (alone, among):
        assert np.array_equal(x, x1) and np.array_equal(y, y1)
    other_agent = S.agent_samples(SPEC, 12346)[0]
    other_seed = S.agent_samples(S.SyntheticSpec(1.0, 1.0, False, 1000, seed=4), 12345)[0]
    assert not np.array_equal(other_agent[:5], x1[:5]) and not np.array_equal(other_seed[:5], x1[:5])
    tr, te = S.counts(SPEC, np.array([12345, 7]))
    assert tr[0] + te[0] == len(y1)


def test_built_block_holds_exactly_the_generated_agents():
    pop = population.SyntheticPopulation(SPEC, 10**6)
    ids = np.array([5, 40, 77, 500_000], dtype=np.int64)
    blk = pop.build(ids, torch.device("cpu"), torch.float64, population.widths(pop, ids))
    tr, te = pop.counts(ids)
    assert blk.train_count.tolist() == tr.tolist() and blk.test_count.tolist() == te.tolist()
    assert blk.train_width == block.aligned_width(tr.max()) and blk.test_width == block.aligned_width(te.max())
    assert blk.train_width % block.ALIGN_ROWS == 0 and blk.train_width - tr.max() < block.ALIGN_ROWS
    for a, k in enumerate(ids):
        x, y = S.agent_samples(SPEC, int(k))
        o, n = int(blk.train_offset[a]), int(blk.train_count[a])
        assert np.array_equal(blk.X_train[o:o + n].numpy(), x[:n]) and np.array_equal(blk.Y_train[o:o + n].numpy(), y[:n])
        o, m = int(blk.test_offset[a]), int(blk.test_count[a])
        assert np.array_equal(blk.X_test[o:o + m].numpy(), x[n:]) and np.array_equal(blk.Y_test[o:o + m].numpy(), y[n:])
    mine, pos = blk.locate(np.array([3, 40, 500_000, 10**6 - 1]))
    assert mine.tolist() == [False, True, True, False] and pos.tolist() == [1, 3]


# --------------------------------------------------------------------------- generator: the FedProx statistics

def test_sample_counts_follow_fedprox_lognormal_capped_and_split_90_10():
    ids = np.arange(20_000)
    tr, te = S.counts(S.SyntheticSpec(1.0, 1.0, False, 10**9, 0), ids)
    n = tr + te
    assert n.min() >= 50
    # int(lognormal(4, 2)) + 50: log(n − 50) has median 4 and P(n − 50 ≥ e^6) = P(Z ≥ 1) = 0.1587
    assert abs(np.log(np.median(n - 50)) - 4.0) < 0.06
    assert abs(np.mean(n - 50 >= np.exp(6)) - 0.1587) < 0.01
    assert np.array_equal(tr, (9 * n) // 10) and te.min() >= 1
    tr_c, te_c = S.counts(S.SyntheticSpec(1.0, 1.0, False, 300, 0), ids)
    assert (tr_c + te_c).max() == 300 and np.array_equal(tr_c + te_c, np.minimum(n, 300))
    assert S.split_counts(np.array([2, 10, 11]))[0].tolist() == [1, 9, 9]


def test_features_have_covariance_diag_j_pow_minus_1_2_and_labels_are_the_argmax():
    spec = S.SyntheticSpec(0.5, 0.5, False, 2000, 1)
    resid, n_total = [], 0
    for k in range(60):
        law, _ = S.agent_law(spec, k)
        x, y = S.agent_samples(spec, k)
        assert np.array_equal(y, np.argmax(x @ law.W + law.b, axis=1))       # y = argmax softmax(x W_k + b_k)
        resid.append(x - law.v)
        n_total += len(y)
    r = np.concatenate(resid)
    assert n_total > 5000
    var = r.var(axis=0)
    expect = np.arange(1, 61) ** -1.2
    assert np.max(np.abs(var / expect - 1)) < 5 * np.sqrt(2 / len(r))        # per feature, 5 standard errors
    corr = np.corrcoef(r[:, :5].T)
    assert np.max(np.abs(corr - np.eye(5))) < 0.1                           # diagonal Σ


def test_alpha_and_beta_set_the_spread_of_the_agents_means():
    def laws(alpha, beta):
        spec = S.SyntheticSpec(alpha, beta, False, 60, 2)
        return [S.agent_law(spec, k)[0] for k in range(400)]

    zero = laws(0.0, 0.0)
    assert all(law.u == 0.0 and law.B == 0.0 for law in zero)              # α = β = 0: one shared prior mean 0
    w_means = np.array([np.concatenate([l.W.ravel(), l.b]).mean() for l in zero])
    assert abs(w_means.std() - 1 / np.sqrt(610)) < 0.01                    # W_k still differ: N(0, 1) entries
    one = laws(1.0, 2.0)
    u = np.array([l.u for l in one])
    B = np.array([l.B for l in one])
    assert abs(u.std() - 1.0) < 0.12 and abs(B.std() - 2.0) < 0.25
    w_means = np.array([l.W.mean() for l in one])
    assert np.corrcoef(w_means, u)[0, 1] > 0.99                            # W_k ~ N(u_k, 1)
    v_means = np.array([l.v.mean() for l in one])
    assert np.corrcoef(v_means, B)[0, 1] > 0.95                            # v_k ~ N(B_k, 1)


def test_iid_variant_shares_one_model_and_centres_features_at_b_k():
    spec = S.SyntheticSpec(0.0, 0.0, True, 100, 5)
    laws = [S.agent_law(spec, k)[0] for k in range(5)]
    W, b = S.global_model(spec)
    for law in laws:
        assert np.array_equal(law.W, W) and np.array_equal(law.b, b) and np.array_equal(law.v, np.zeros(60))


# --------------------------------------------------------------------------- virtual agents

def _pools(scheme, samples=40, cpa=2, alpha=0.3):
    ds = load_dataset("digits", "")
    spec = V.VirtualSpec(scheme, samples, cpa, alpha, 0.25, seed=1)
    return ds, spec, V.ClassPools(ds, spec)


@pytest.mark.parametrize("scheme", ["shards", "dirichlet"])
def test_virtual_agents_are_deterministic_distinct_samples_with_a_label_mixture(scheme):
    ds, spec, pools = _pools(scheme)
    ids = np.array([0, 1, 123_456, 9_999_999])
    tr, te = pools.indices(spec, ids)
    tr2, te2 = pools.indices(spec, ids[::-1].copy())
    n_tr, n_te = V.split_counts(spec)
    assert (n_tr, n_te) == (30, 10)
    tr, te, tr2, te2 = (a.reshape(4, -1) for a in (tr, te, tr2, te2))
    assert np.array_equal(tr, tr2[::-1]) and np.array_equal(te, te2[::-1])   # a function of (seed, k) only
    for a in range(4):
        both = np.concatenate([tr[a], te[a]])
        assert len(np.unique(both)) == len(both)                             # no sample twice in an agent
        labels = np.unique(ds.y[both])
        if scheme == "shards":
            assert len(labels) == 2 and np.bincount(ds.y[both])[labels].tolist() == [20, 20]
    assert not np.array_equal(tr[0], tr[1])


def test_virtual_population_can_exceed_the_dataset_and_agents_may_share_samples():
    ds, spec, pools = _pools("shards", samples=40)
    pop = population.VirtualPopulation(ds, spec, num_agents=10**6)
    ids = np.arange(0, 10**6, 10**4)
    blk = pop.build(ids, torch.device("cpu"), torch.float32, population.widths(pop, ids))
    assert blk.num_agents == 100 and blk.X_train.shape == (100 * 30,) + ds.x.shape[1:]
    tr, _ = pools.indices(spec, ids)
    assert len(np.unique(tr)) < len(tr)                                       # 3000 draws from 1797 samples
    assert np.array_equal(blk.X_train.numpy(), ds.x[tr])


def test_virtual_population_that_cannot_be_drawn_is_a_data_error():
    from mpifedmeta.data import DataError
    with pytest.raises(DataError, match="samples_per_agent"):
        _pools("dirichlet", samples=400)
    with pytest.raises(DataError, match="classes_per_agent"):
        _pools("shards", cpa=11)


# --------------------------------------------------------------------------- cost follows the cohort

def test_cohort_sampling_is_o_k_in_memory_and_deterministic():
    a = rng.cohort(0, 7, 10**7, 1000)
    tracemalloc.start()
    b = rng.cohort(0, 7, 10**7, 1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.array_equal(a, b) and len(np.unique(a)) == 1000 and a.max() < 10**7
    assert peak < 200_000, f"cohort sampling allocated {peak} bytes for N = 10^7 (an O(N) array would be 80 MB)"


def _world():
    from mpi4py import MPI
    from mpifedmeta.parallel.dist import World
    return World(MPI.COMM_SELF, 0, 1, local_rank=0, local_size=1)


def _synthetic_setup(N, overrides=()):
    from mpifedmeta.run import config, session
    cfg = config.load(None, ["data.dataset=\"synthetic\"", f"data.num_agents={N}", "data.holdout_agents=10",
                             "data.synthetic_max_samples=80", "eval.agents=20", "eval.holdout_agents=5",
                             "train.agents_per_round=6", "model.name=\"linear\"", "train.local_steps=2",
                             "eval.finetune_steps=[0,1]", "output.dir=\"/nonexistent/never-written\""] + list(overrides))
    threads = torch.get_num_threads()
    s = session.setup(cfg, _world())
    torch.set_num_threads(threads)
    return s


def test_setup_memory_does_not_grow_with_the_population():
    peaks = {}
    for N in (10**3, 10**7):
        tracemalloc.start()
        _synthetic_setup(N)
        peaks[N] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[10**7] < peaks[10**3] + 1_000_000, peaks                  # an int32 per agent would be 40 MB


def test_agents_generated_per_round_are_the_cohort_and_per_evaluation_the_evaluated(monkeypatch):
    from mpifedmeta.federation import algorithm
    s = _synthetic_setup(10**6)
    params = s.w0
    made = []
    real = S.generate
    monkeypatch.setattr(S, "generate", lambda spec, ids: made.append(np.asarray(ids).copy()) or real(spec, ids))
    for r in (1, 2):
        cohort = rng.cohort(s.cfg.train.seed, r, s.num_train, 6)
        w = algorithm.cohort_weights(cohort, s.population.train_counts, "samples")
        algorithm.local_round(s.round.backend, s.round.agents.for_round(cohort), params, s.round.spec, r, cohort, w)
        assert np.array_equal(made[-1], cohort)
    made.clear()
    row = s.round.evaluate(params, 0)
    assert np.array_equal(np.sort(np.concatenate(made)), np.concatenate([s.round.evals.train_ids, s.round.evals.holdout_ids]))
    assert row["train_agent_acc"].shape == (2, 20) and row["holdout_agent_acc"].shape == (2, 5)
    assert s.round.evals.holdout_ids.min() >= s.num_train and len(np.unique(s.round.evals.train_ids)) == 20


def test_round_does_not_depend_on_how_the_cohort_is_shared():
    """The mechanism behind rank independence: any split of a cohort into built blocks gives the same limbs."""
    from mpifedmeta.federation import algorithm
    for batch in ("8", "\"full\""):
        s = _synthetic_setup(10**5, [f"train.batch_size={batch}", "train.weighting=\"samples\""])
        params = s.w0
        cohort = rng.cohort(0, 1, s.num_train, 6)
        w = algorithm.cohort_weights(cohort, s.population.train_counts, "samples")
        widths = population.widths(s.population, cohort)
        sums = []
        for P in (1, 2, 3, 6):
            total = 0
            for r in range(P):
                blk = s.population.build(population.share(cohort, r, P), s.device, s.dtype, widths)
                limbs, bad = local_round_array(s.round.backend, blk, params, s.round.spec, 1, cohort, w)
                assert bad == 0
                total = total + limbs
            sums.append(total)
        assert all(np.array_equal(sums[0], t) for t in sums[1:]), batch


def test_a_rank_with_no_share_of_the_cohort_contributes_nothing():
    s = _synthetic_setup(1000)
    params = s.w0
    blk = s.population.build(np.zeros(0, dtype=np.int64), s.device, s.dtype, (5, 2))
    assert blk.num_agents == 0
    limbs, bad = local_round_array(s.round.backend, blk, params, s.round.spec, 1, np.array([3, 9]), np.array([1, 1]))
    assert bad == 0 and not limbs.any()


def test_stored_partition_can_evaluate_a_sample_of_its_holdout_agents():
    from mpifedmeta.run import config, session
    cfg = config.load(None, ["data.num_agents=30", "data.holdout_agents=10", "eval.holdout_agents=4",
                             "eval.agents=5", "output.dir=\"/nonexistent/never-written\""])
    threads = torch.get_num_threads()
    s = session.setup(cfg, _world())
    torch.set_num_threads(threads)
    assert len(s.round.evals.holdout_ids) == 4 and s.round.evals.holdout_ids.min() >= 20 and len(np.unique(s.round.evals.holdout_ids)) == 4
    assert len(s.round.evals.train_ids) == 5 and s.round.evals.train_ids.max() < 20
    row = s.round.evaluate(s.w0, 0)
    assert row["holdout_agent_acc"].shape[1] == 4 and row["train_agent_acc"].shape[1] == 5


def test_stationarity_of_a_generated_population_visits_every_training_agent():
    values = []
    for chunk in (7, 64):
        s = _synthetic_setup(40, ["eval.stationarity=true", f"eval.chunk={chunk}", "train.dtype=\"float64\""])
        row = s.round.evaluate(s.w0, 0)
        values.append((row["meta_loss_full"], row["grad_norm_sq"]))
    assert np.isfinite(values[0]).all() and np.allclose(values[0], values[1], rtol=1e-10)
    # independent reference: F(w) = (1/30) Σ_k f_k(w − α∇f_k(w)) over the 30 training agents' full
    # training splits, regenerated here, with plain autograd (ν = 1)
    from mpifedmeta.core import reference
    spec = s.population.spec
    w = s.layout.split(s.w0)
    loss = reference.make_loss(s.model)
    total = 0.0
    for k in range(30):
        x, y = S.agent_samples(spec, k)
        n = (9 * len(y)) // 10
        X, Y, m = torch.tensor(x[:n]), torch.tensor(y[:n]), torch.ones(n, dtype=torch.float64)
        p = {name: v.clone().requires_grad_(True) for name, v in w.items()}
        g = torch.autograd.grad(loss(p, X, Y, m), list(p.values()))
        theta = {name: v - s.cfg.train.alpha * gi for (name, v), gi in zip(p.items(), g)}
        total += float(loss(theta, X, Y, m).detach()) / 30
    assert abs(values[0][0] - total) < 1e-10 * abs(total)


# --------------------------------------------------------------------------- runs: ranks, resume, output, errors

SYN = sets(data__dataset="synthetic", data__num_agents=1_000_000, data__holdout_agents=1000,
           data__synthetic_max_samples=100, eval__agents=12, eval__holdout_agents=4, model__name="linear",
           train__agents_per_round=7, train__weighting="samples")
VIRT = sets(data__dataset="digits", data__partition="virtual-dirichlet", data__num_agents=100_000,
            data__holdout_agents=10, data__samples_per_agent=30, eval__agents=9, train__agents_per_round=7,
            train__batch_size="full")


@pytest.mark.parametrize("variant", ["synthetic", "virtual"])
def test_generated_runs_bit_identical_for_1_2_3_ranks(variant, tmp_path):
    cfg = write_tiny_config(tmp_path)
    runs = {}
    for P in (1, 2, 3):
        out = str(tmp_path / f"P{P}")
        proc = run_cli(["run", cfg] + sets(train__rounds=3, output__dir=out) + (SYN if variant == "synthetic" else VIRT),
                       np_=P)
        assert proc.returncode == 0, f"P={P}: {describe(proc)}"
        runs[P] = (final_model(out), read_metrics(out))
    model1, metrics1 = runs[1]
    for P in (2, 3):
        assert_models_identical(model1, runs[P][0], f"{variant}: final model P=1 vs P={P}")
        for name in ("train/train_loss", "eval/train_agent_loss", "eval/holdout_agent_acc", "eval/train_agent_ids"):
            assert arrays_identical(metrics1[name], runs[P][1][name]), f"{variant}: {name} P=1 vs P={P}"


def test_synthetic_resume_is_exact_and_metrics_hold_no_per_agent_partition(tmp_path):
    cfg = write_tiny_config(tmp_path)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    proc = run_cli(["run", cfg] + SYN + sets(train__rounds=4, output__dir=full))
    assert proc.returncode == 0, describe(proc)
    proc = run_cli(["run", cfg] + SYN + sets(train__rounds=2, output__dir=part))
    assert proc.returncode == 0, describe(proc)
    proc = run_cli(["resume", part, "--rounds", "4"])
    assert proc.returncode == 0, describe(proc)
    assert checkpoint_rounds(part)[-1] == 4
    assert_models_identical(final_model(full), final_model(part), "resumed vs uninterrupted")
    with h5py.File(os.path.join(full, "metrics.h5"), "r") as f:
        p = f["partition"]
        assert len(p.keys()) == 0                                            # no O(N) arrays
        assert p.attrs["scheme"] == "synthetic" and int(p.attrs["num_agents"]) == 1_000_000
        assert float(p.attrs["alpha"]) == 1.0 and int(p.attrs["max_samples"]) == 100
        assert f["eval/train_agent_acc"].shape[2] == 12 and f["eval/holdout_agent_acc"].shape[2] == 4
        assert f["eval/holdout_agent_ids"][:].min() >= 999_000


@pytest.mark.parametrize("extra, words", [
    (sets(data__synthetic_alpha=-0.5), ["data.synthetic_alpha", ">= 0"]),
    (sets(data__synthetic_beta=-1), ["data.synthetic_beta"]),
    (sets(data__holdout_agents=2_000_000), ["data.holdout_agents"]),
    (sets(data__num_agents=2**31), ["data.num_agents"]),
    (sets(data__synthetic_max_samples=1), ["data.synthetic_max_samples"]),
    (sets(model__name="cnn"), ["model.name", "synthetic"]),
    (sets(eval__agents="all"), ["eval.agents", "999000"]),
    (sets(eval__holdout_agents=0), ["eval.holdout_agents"]),
])
def test_bad_synthetic_config_is_one_line_exit_2(extra, words, tmp_path):
    cfg = write_tiny_config(tmp_path)
    proc = run_cli(["run", cfg] + SYN + extra + sets(output__dir=str(tmp_path / "o")))
    assert_one_error_line(proc, 2, *words)
    assert not os.path.exists(tmp_path / "o" / "metrics.h5")


def test_virtual_population_that_cannot_be_drawn_exits_2(tmp_path):
    cfg = write_tiny_config(tmp_path)
    proc = run_cli(["run", cfg] + VIRT + sets(data__samples_per_agent=500, output__dir=str(tmp_path / "o")), np_=2)
    assert_one_error_line(proc, 2, "data.samples_per_agent = 500")
    assert not os.path.exists(tmp_path / "o")

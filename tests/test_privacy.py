"""Differential privacy (DP-FedAvg): clipping exact, the noise's moments, bit-identity on 1/2/3 ranks and on
resume, the accountant against dp-accounting used directly and against Opacus, the calibration, bad values."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

import algorithm_reference as ar
from helpers import (arrays_identical, assert_models_identical, assert_ok, assert_one_error_line, checkpoint_path,
                     final_model, read_metrics, read_model, run_cli, sets)
from mpifedmeta.core import rng
from mpifedmeta.privacy import accountant
from mpifedmeta.privacy.mechanism import PrivacySpec, clip_updates, noise
from mpifedmeta.storage import metrics

DP = sets(privacy__clip=0.05, privacy__noise_multiplier=1.0, train__rounds=3, eval__every=3,
          output__checkpoint_every=1)


def test_clip_updates_bounds_each_agents_norm_and_keeps_small_ones():
    w = torch.randn(50, dtype=torch.float64)
    theta = w + torch.stack([0.01 * torch.ones(50), 3 * torch.ones(50), torch.zeros(50)]).double()
    clip_updates(theta, w, 0.5)
    norms = torch.linalg.vector_norm(theta - w, dim=1)
    assert torch.allclose(norms, torch.tensor([0.01 * math.sqrt(50), 0.5, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose((theta - w)[1], torch.full((50,), 0.5 / math.sqrt(50), dtype=torch.float64))


def test_noise_is_a_pure_function_of_seed_and_round_with_the_right_moments():
    spec = PrivacySpec(0.5, 2.0, 1e-5, "poisson", "rdp", 1000, 10)
    a, b = noise(spec, 3, 7, 20000, None), noise(spec, 3, 7, 20000, None)
    assert np.array_equal(a, b) and a.dtype == np.float64
    assert not np.array_equal(a, noise(spec, 3, 8, 20000, None))
    assert abs(a.std() / spec.noise_std - 1) < 0.03 and abs(a.mean()) < 4 * spec.noise_std / math.sqrt(a.size)
    shared = np.arange(20000) % 2 == 0
    assert np.all(noise(spec, 3, 7, 20000, shared)[~shared] == 0)


def test_poisson_cohort_is_binomial_sized_and_never_builds_an_array_of_n():
    sizes = [len(rng.poisson_cohort(0, r, 1000, 0.05)) for r in range(400)]
    assert abs(np.mean(sizes) - 50) < 2 and abs(np.std(sizes) - math.sqrt(1000 * 0.05 * 0.95)) < 1.5
    big = rng.poisson_cohort(0, 1, 10**7, 1e-4)            # 10^7 agents: O(cohort) (a full array would be 80 MB)
    assert 800 < len(big) < 1200 and np.all(np.diff(big) > 0) and big.max() < 10**7


def _reference_round(out: str, C: float, m: int, tau: int, beta: float):
    """The first DP round with z = 0 by hand: w + Σ_i clip(Δ_i) / m, FedAvg local SGD in float64."""
    from mpifedmeta.data import load_dataset
    from mpifedmeta.models import build_model
    run = metrics.read(out)
    with h5py.File(f"{out}/metrics.h5") as f:
        ptr, idx = f["partition/train_ptr"][()], f["partition/train_idx"][()]
    ds = load_dataset("digits", "", "float64")
    model = build_model("mlp", tuple(ds.x.shape[1:]), 10, [16]).double()
    names = [n for n, _ in model.named_parameters()]
    w0 = {n: torch.as_tensor(v) for n, v in read_model(checkpoint_path(out, 0)).items()}
    w0 = {n: w0[n] for n in names}
    cohort = rng.cohort(run.config["train"]["seed"], 1, 10, m)
    total = {n: torch.zeros_like(v) for n, v in w0.items()}
    for a in cohort:
        rows = idx[ptr[a]:ptr[a + 1]]
        x, y = torch.as_tensor(ds.x[rows], dtype=torch.float64), torch.as_tensor(ds.y[rows])
        local = ar.fedavg_local(model, w0, x, y, tau, beta)
        d = {n: local[n] - w0[n] for n in names}
        norm = math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))
        for n in names:
            total[n] += d[n] * min(1.0, C / norm)
    return {n: (w0[n] + total[n] / m).numpy() for n in names}


def test_clipping_is_exact_against_a_float64_per_agent_reference(cfg_path, tmp_path):
    out = str(tmp_path / "z0")
    assert_ok(run_cli(["run", cfg_path] + sets(privacy__clip=0.05, privacy__noise_multiplier=0.0, train__rounds=1,
                                               train__nu=0, train__dtype="float64", train__batch_size="full",
                                               output__dir=out, output__checkpoint_every=1)))
    got = read_model(checkpoint_path(out, 1))
    want = _reference_round(out, 0.05, 5, 2, 0.05)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-10, atol=1e-12, err_msg=n)
    assert np.isinf(read_metrics(out)["train/epsilon"]).all()       # z = 0: no privacy


def test_noise_reaches_the_model_with_std_z_c_over_m(cfg_path, tmp_path):
    outs = {}
    for z in (0.0, 2.0):
        outs[z] = str(tmp_path / f"z{z}")
        assert_ok(run_cli(["run", cfg_path] + sets(privacy__clip=0.05, privacy__noise_multiplier=z, train__rounds=1,
                                                   train__dtype="float64", output__dir=outs[z],
                                                   output__checkpoint_every=1, model__hidden=[64])))
    a, b = final_model(outs[0.0]), final_model(outs[2.0])
    diff = np.concatenate([(b[n] - a[n]).ravel() for n in a])
    assert diff.size >= 1000
    std = 2.0 * 0.05 / 5                                              # z·C/m, m = agents_per_round
    assert abs(diff.std() / std - 1) < 0.05 and abs(diff.mean()) < 4 * std / math.sqrt(diff.size)


@pytest.mark.parametrize("extra", [
    sets(privacy__sampling="fixed"),
    sets(privacy__sampling="poisson", privacy__accountant="pld"),
    sets(privacy__sampling="poisson", algorithm__name="ditto", algorithm__lam=0.5),
    sets(privacy__sampling="fixed", algorithm__name="fedrep", server__optimizer="adam", server__lr=0.01),
], ids=["fixed", "poisson-pld", "ditto", "fedrep-adam"])
def test_dp_runs_are_bit_identical_on_1_2_3_ranks(extra, cfg_path, tmp_path):
    outs = {}
    for P in (1, 2, 3):
        outs[P] = str(tmp_path / f"P{P}")
        proc = run_cli(["run", cfg_path] + DP + extra + sets(output__dir=outs[P]), np_=P)
        assert_ok(proc)
        assert "privacy: epsilon = " in proc.stdout
    m1 = read_metrics(outs[1])
    assert np.all(np.diff(m1["train/epsilon"]) > 0) and np.isfinite(m1["train/epsilon"]).all()
    for P in (2, 3):
        assert_models_identical(final_model(outs[1]), final_model(outs[P]), f"1 vs {P} ranks")
        mp = read_metrics(outs[P])
        for k in ("train/train_loss", "train/epsilon", "train/num_sampled", "eval/train_agent_acc"):
            assert arrays_identical(m1[k], mp[k]), k


def _z(out: str) -> float:
    with h5py.File(f"{out}/metrics.h5", "r") as f:
        return float(f["train/epsilon"].attrs["privacy_noise_multiplier"])


def test_resumed_dp_run_continues_noise_and_epsilon_exactly(cfg_path, tmp_path):
    import os
    args = sets(privacy__clip=0.05, privacy__target_epsilon=20.0, privacy__sampling="poisson", eval__every=2,
                output__checkpoint_every=1, train__rounds=4)
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    assert_ok(run_cli(["run", cfg_path] + args + sets(output__dir=straight)))
    assert_ok(run_cli(["run", cfg_path] + args + sets(output__dir=stopped), np_=2))
    for r in (3, 4):                          # as if stopped after round 2
        os.remove(checkpoint_path(stopped, r))
    assert_ok(run_cli(["resume", stopped], np_=3))
    assert_models_identical(final_model(straight), final_model(stopped), "straight vs stopped and resumed")
    a, c = read_metrics(straight), read_metrics(stopped)
    for k in ("train/epsilon", "train/num_sampled", "train/train_loss"):
        assert arrays_identical(a[k], c[k]), k
    assert 0.95 * 20.0 <= a["train/epsilon"][-1] <= 20.0 * (1 + 1e-9)


def test_extending_a_calibrated_run_keeps_its_noise_multiplier(cfg_path, tmp_path):
    out = str(tmp_path / "short")
    assert_ok(run_cli(["run", cfg_path] + sets(privacy__clip=0.05, privacy__target_epsilon=20.0, train__rounds=2,
                                               output__dir=out)))
    z = _z(out)
    proc = run_cli(["resume", out, "--rounds", "4"])
    assert_ok(proc)
    with h5py.File(checkpoint_path(out, 4), "r") as f:
        assert float(f.attrs["privacy_noise_multiplier"]) == z        # not recalibrated for 4 rounds
    eps = read_metrics(out)["train/epsilon"]
    assert eps[1] <= 20.0 < eps[3]                                    # the extension spends more than the target


@pytest.mark.parametrize("sampling, acc", [("poisson", "rdp"), ("poisson", "pld"), ("fixed", "rdp")])
def test_calibrated_z_gives_epsilon_at_most_the_target_and_within_5_percent(sampling, acc):
    spec = PrivacySpec(1.0, 0.0, 1e-5, sampling, acc, 10000, 100)
    z = accountant.calibrate(spec, 4.0, 50)
    eps = accountant.epsilon(spec, 50, z)
    assert 0.95 * 4.0 <= eps <= 4.0, (z, eps)
    ledger = accountant.Ledger(PrivacySpec(1.0, z, 1e-5, sampling, acc, 10000, 100))
    assert ledger.advance() < ledger.advance()


def test_ledger_equals_the_library_used_directly():
    import dp_accounting as dp
    spec = PrivacySpec(1.0, 1.1, 1e-5, "poisson", "rdp", 10**5, 1000)
    ledger = accountant.Ledger(spec)
    for r in range(1, 6):
        acc = dp.rdp.RdpAccountant()
        acc.compose(dp.PoissonSampledDpEvent(0.01, dp.GaussianDpEvent(1.1)), r)
        assert ledger.advance() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    fixed = PrivacySpec(1.0, 1.1, 1e-5, "fixed", "rdp", 10**5, 1000)
    acc = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp.SampledWithoutReplacementDpEvent(10**5, 1000, dp.GaussianDpEvent(0.55)), 7)
    assert accountant.epsilon(fixed, 7) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    resumed = accountant.Ledger(spec, start_round=3)
    again = accountant.Ledger(spec)
    for _ in range(3):
        again.advance()
    assert resumed.advance() == again.advance()


def test_poisson_rdp_agrees_with_opacus():
    opacus = pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant
    for z, q, steps in ((1.1, 0.01, 100), (0.8, 0.05, 30), (2.0, 0.001, 1000)):
        acc = RDPAccountant()
        acc.history = [(z, q, steps)]
        theirs = acc.get_epsilon(1e-5)
        ours = accountant.epsilon(PrivacySpec(1.0, z, 1e-5, "poisson", "rdp", 100000, int(q * 100000)), steps)
        assert ours == pytest.approx(theirs, rel=0.05), (z, q, steps, ours, theirs, opacus.__version__)


@pytest.mark.parametrize("overrides, must", [
    (sets(privacy__clip=0.0, privacy__noise_multiplier=1.0), "privacy.clip = 0.0: must be > 0"),
    (sets(privacy__clip=-1, privacy__noise_multiplier=1.0), "privacy.clip = -1.0: must be > 0"),
    (sets(privacy__clip=1.0, privacy__noise_multiplier=-0.5), "privacy.noise_multiplier = -0.5: must be >= 0"),
    (sets(privacy__clip=1.0, privacy__noise_multiplier=1.0, privacy__delta=1.0), "privacy.delta = 1.0: must be in (0, 1)"),
    (sets(privacy__clip=1.0, privacy__target_epsilon=2.0, train__rounds=0), "needs train.rounds > 0"),
    (sets(privacy__noise_multiplier=1.0), "privacy.noise_multiplier = 1.0 needs privacy.clip"),
    (sets(privacy__clip=1.0), "give exactly one of privacy.noise_multiplier or privacy.target_epsilon"),
    (sets(privacy__clip=1.0, privacy__noise_multiplier=1.0, train__weighting="samples"), "needs uniform weights"),
    (sets(privacy__clip=1.0, privacy__noise_multiplier=1.0, privacy__accountant="pld"), "not supported"),
    (sets(privacy__clip=1.0, privacy__target_epsilon=1e-3, privacy__delta=1e-10), "not reachable in 4 rounds"),
])
def test_bad_privacy_settings_exit_2_with_one_line(overrides, must, cfg_path, tmp_path):
    import os
    out = str(tmp_path / "never")
    assert_one_error_line(run_cli(["run", cfg_path] + overrides + sets(output__dir=out)), 2, must)
    assert not os.path.exists(os.path.join(out, "metrics.h5"))


def test_empty_poisson_rounds_apply_the_noise_alone(cfg_path, tmp_path):
    out = str(tmp_path / "sparse")
    assert_ok(run_cli(["run", cfg_path] + sets(privacy__clip=0.05, privacy__noise_multiplier=1.0,
                                               privacy__sampling="poisson", train__agents_per_round=1,
                                               train__rounds=8, output__dir=out, output__checkpoint_every=1, output__keep=20)))
    m = read_metrics(out)
    empty = np.flatnonzero(m["train/num_sampled"] == 0)
    assert empty.size, m["train/num_sampled"]
    r = int(m["train/round"][empty[0]])
    before, after = read_model(checkpoint_path(out, r - 1)), read_model(checkpoint_path(out, r))
    assert any(not np.array_equal(before[n], after[n]) for n in before)      # the noise moved the model
    assert np.isnan(m["train/train_loss"][empty[0]])


def test_report_plots_accuracy_against_epsilon(cfg_path, tmp_path):
    import os
    out, dest = str(tmp_path / "dp"), str(tmp_path / "report")
    assert_ok(run_cli(["run", cfg_path] + DP + sets(eval__every=1, output__dir=out)))
    assert_ok(run_cli(["report", out, "--out", dest]))
    assert os.path.getsize(os.path.join(dest, "privacy.png")) > 1000
    eps = read_metrics(out)["train/epsilon"][-1]
    assert f"(DP, ε={eps:.3g})" in open(os.path.join(dest, "summary.md")).read()

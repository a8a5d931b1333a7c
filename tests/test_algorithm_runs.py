"""The plug-in algorithms end to end: bit-identical on 1/2/3 ranks, per-agent and server state in every
checkpoint, resume exact (also on another number of ranks), bad input refused before anything runs."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from helpers import (arrays_identical, assert_models_identical, assert_ok, assert_one_error_line, checkpoint_path,
                     checkpoint_rounds, file_hashes, final_model, read_metrics, run_cli, sets)
from mpifedmeta.storage import metrics

RUNS = {   # algorithm → overrides (stateful ones with an adaptive server optimizer: both states resumed)
    "pfedme": sets(algorithm__name="pfedme", algorithm__inner_lr=0.05, algorithm__lam=2.0, server__optimizer="momentum"),
    "ditto": sets(algorithm__name="ditto", algorithm__lam=0.5, server__optimizer="adam", server__lr=0.01),
    "fedrep": sets(algorithm__name="fedrep", algorithm__head_steps=3, server__optimizer="yogi", server__lr=0.01),
}
COMPARED = ("train/round", "train/train_loss", "eval/train_agent_acc", "eval/holdout_agent_loss",
            "eval/personal_agent_acc", "eval/personal_agent_loss", "eval/holdout_personal_agent_acc",
            "eval/personal_acc_mean")


def groups(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{g}/{k}": f[g][k][()] for g in ("server", "agent_state") if g in f for k in f[g]}


def final_groups(out: str) -> dict[str, np.ndarray]:
    return groups(checkpoint_path(out, checkpoint_rounds(out)[-1]))


def assert_same_run(a: str, b: str, what: str) -> None:
    assert_models_identical(final_model(a), final_model(b), what)
    ga, gb = final_groups(a), final_groups(b)
    assert sorted(ga) == sorted(gb), what
    for k in ga:
        assert arrays_identical(ga[k], gb[k]), f"{what}: {k}"
    ma, mb = read_metrics(a), read_metrics(b)
    for k in COMPARED:
        assert arrays_identical(ma[k], mb[k]), f"{what}: {k}"


@pytest.mark.parametrize("name", list(RUNS))
def test_algorithm_is_bit_identical_on_1_2_3_ranks(name, cfg_path, tmp_path):
    outs = {}
    for P in (1, 2, 3):
        outs[P] = str(tmp_path / f"P{P}")
        proc = run_cli(["run", cfg_path] + RUNS[name] + sets(output__dir=outs[P]), np_=P)
        assert_ok(proc)
        assert f"{name}(" in proc.stdout and "(the algorithm's personalized model)" in proc.stdout
    m = read_metrics(outs[1])
    assert np.all(np.isfinite(m["train/train_loss"])) and "train/meta_loss" not in m
    assert m["eval/personal_agent_acc"].shape == (3, 10) and m["eval/holdout_personal_agent_acc"].shape == (3, 2)
    assert np.all((m["eval/personal_acc_mean"] >= 0) & (m["eval/personal_acc_mean"] <= 1))
    g = final_groups(outs[1])
    assert g["server/m"].dtype == np.float64 and np.any(g["server/m"] != 0)
    if name != "pfedme":
        assert g["agent_state/values"].shape[0] == 12 and g["agent_state/has"].dtype == np.uint8
        trained = np.flatnonzero(g["agent_state/has"])
        assert 0 < len(trained) <= 10 and trained.max() < 10          # holdout agents never get state
    else:
        assert "agent_state/values" not in g
    for P in (2, 3):
        assert_same_run(outs[1], outs[P], f"{name}: 1 vs {P} ranks")


@pytest.mark.parametrize("name", ["ditto", "fedrep"])
def test_resume_with_state_on_another_number_of_ranks_is_exact(name, cfg_path, tmp_path):
    straight, part = str(tmp_path / "straight"), str(tmp_path / "part")
    assert_ok(run_cli(["run", cfg_path] + RUNS[name] + sets(output__dir=straight, output__checkpoint_every=1), np_=1))
    assert_ok(run_cli(["run", cfg_path] + RUNS[name] + sets(output__dir=part, output__checkpoint_every=1,
                                                            train__rounds=2), np_=2))
    assert_ok(run_cli(["resume", part, "--rounds", "4"], np_=3))
    assert_same_run(straight, part, f"{name}: 1 rank straight vs 2 ranks then 3")


def test_resume_refuses_a_checkpoint_without_the_agents_state_and_changes_nothing(cfg_path, tmp_path):
    out = str(tmp_path / "run")
    assert_ok(run_cli(["run", cfg_path] + RUNS["ditto"] + sets(output__dir=out, train__rounds=2), np_=1))
    with h5py.File(checkpoint_path(out, 2), "a") as f:
        del f["agent_state"]
    before = file_hashes(out)
    line = assert_one_error_line(run_cli(["resume", out, "--rounds", "4"]), 2, "agent_state")
    assert "is missing" in line
    assert file_hashes(out) == before


def test_metrics_of_older_versions_with_meta_loss_still_read_and_resume(cfg_path, tmp_path):
    out = str(tmp_path / "run")
    assert_ok(run_cli(["run", cfg_path] + sets(output__dir=out, train__rounds=2)))
    with h5py.File(os.path.join(out, "metrics.h5"), "a") as f:
        f.move("train/train_loss", "train/meta_loss")       # the column's name before the algorithms
    loss = metrics.read(out).train["train_loss"]
    assert loss.shape == (2,) and np.all(np.isfinite(loss))
    assert_ok(run_cli(["resume", out, "--rounds", "4"]))
    m = read_metrics(out)
    assert "train/train_loss" not in m and m["train/meta_loss"].shape == (4,)
    assert np.all(np.isfinite(m["train/meta_loss"]))


@pytest.mark.parametrize("overrides, must", [
    (sets(algorithm__name="ditto", data__partition="virtual-shards", data__num_agents=1000),
     "algorithm.name = 'ditto' keeps state per agent"),
    (sets(algorithm__name="fedrep", algorithm__head=["nope"]), "algorithm.head = ['nope']: no parameter named 'nope'"),
    (sets(algorithm__name="pfedme", algorithm__lam=0), "algorithm.lam = 0.0: must be > 0"),
    (sets(algorithm__name="ditto", algorithm__bogus=1), "unknown key algorithm.bogus for algorithm 'ditto'"),
    (sets(server__optimizer="adamw"), "server.optimizer = 'adamw': must be one of sgd, momentum, adagrad, adam, yogi"),
    (sets(server__beta2=1.0), "server.beta2 = 1.0: must be in [0, 1)"),
    (sets(algorithm__name="no_such_file.py:build"), "algorithm.name = 'no_such_file.py:build': file no_such_file.py not found"),
])
def test_bad_algorithm_or_server_settings_exit_2_with_one_line_and_write_nothing(overrides, must, cfg_path, tmp_path):
    out = str(tmp_path / "never")
    assert_one_error_line(run_cli(["run", cfg_path] + overrides + sets(output__dir=out)), 2, must)
    assert not os.path.exists(os.path.join(out, "metrics.h5"))


def test_config_lists_every_algorithm_and_its_keys():
    proc = run_cli(["config"])
    assert_ok(proc)
    for text in ("[algorithm]", 'name = "meta"', '# name = "pfedme"', "inner_steps = 5", '# name = "ditto"',
                 "personal_lr = (default)", '# name = "fedrep"', "head_steps", "[server]", 'optimizer = "sgd"'):
        assert text in proc.stdout, text


def test_user_algorithm_config_runs_the_fedprox_example(tmp_path):
    out = str(tmp_path / "fedprox")
    proc = run_cli(["run", "configs/fedprox.toml"] + sets(output__dir=out, train__rounds=3, eval__every=3))
    assert_ok(proc)
    assert "examples/fedprox.py:build(mu=0.01)" in proc.stdout
    stored = metrics.read(out).config["algorithm"]
    assert stored == {"name": "examples/fedprox.py:build", "mu": 0.01}


def test_report_shows_the_personalized_models_next_to_fine_tuning(cfg_path, tmp_path):
    runs = {}
    for name, extra in (("meta", []), ("ditto", RUNS["ditto"])):
        runs[name] = str(tmp_path / name)
        assert_ok(run_cli(["run", cfg_path] + extra + sets(output__dir=runs[name], train__rounds=2)))
    dest = str(tmp_path / "report")
    assert_ok(run_cli(["report", runs["meta"], runs["ditto"], "--out", dest]))
    assert os.path.getsize(os.path.join(dest, "personal.png")) > 1000
    assert os.path.getsize(os.path.join(dest, "train_loss.png")) > 1000
    text = open(os.path.join(dest, "summary.md")).read()
    assert "train acc, own model (%)" in text and "| ditto + adam |" in text
    row = next(line for line in text.splitlines() if line.startswith("| ditto + adam |"))
    acc = metrics.read(runs["ditto"]).personal["personal_acc_mean"][-1]
    assert f"{100 * acc:.1f}" in row
    meta_row = next(line for line in text.splitlines() if line.startswith("| nu=2 exact |"))
    assert meta_row.count("–") >= 2            # no personalized model: dashes in those columns


@pytest.mark.parametrize("name", ["ditto", "fedrep"])
def test_stateful_algorithm_does_not_depend_on_the_agent_chunk(name, cfg_path, tmp_path):
    outs = {}
    for chunk, P in ((0, 1), (2, 3)):
        outs[chunk] = str(tmp_path / f"chunk{chunk}")
        assert_ok(run_cli(["run", cfg_path] + RUNS[name] + sets(output__dir=outs[chunk], train__agent_chunk=chunk),
                          np_=P))
    assert_same_run(outs[0], outs[2], f"{name}: agent chunk 0 on 1 rank vs 2 on 3 ranks")

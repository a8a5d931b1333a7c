"""The command line as a user runs it (subprocesses): run, outputs on disk, exit code 2 errors,
config, info, report."""

import json
import os
import re

import h5py
import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from helpers import (assert_ok, assert_one_error_line, checkpoint_path, checkpoint_rounds, copy_run, describe,
                     file_hashes, run_cli, sets, write_tiny_config)
from mpifedmeta.run import config as cfgmod

ROUNDS, EVERY, KS = 5, 2, [0, 1, 2]
N, H, K_PER_ROUND = 12, 2, 5
OVERRIDES = sets(train__rounds=ROUNDS, eval__every=EVERY, output__checkpoint_every=2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run: (config path, overrides, out dir, completed process)."""
    base = tmp_path_factory.mktemp("cli")
    cfg = write_tiny_config(base)
    out = str(base / "out")
    overrides = OVERRIDES + sets(output__dir=out)
    proc = run_cli(["run", cfg] + overrides)
    assert_ok(proc)
    return cfg, overrides, out, proc


def resolved_config(cfg_path, overrides) -> dict:
    items = [overrides[i + 1] for i in range(0, len(overrides), 2)]
    return cfgmod.load(cfg_path, items).raw


def expected_param_shapes():
    from mpifedmeta.data import load_dataset
    from mpifedmeta.models import build_model
    ds = load_dataset("digits", "")
    model = build_model("mlp", tuple(ds.x.shape[1:]), ds.num_classes, [16])
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# --------------------------------------------------------------------------- a successful run

def test_run_exits_0_and_prints_final_table(finished):
    _, _, out, proc = finished
    text = proc.stdout
    assert "personalized test accuracy" in text, describe(proc)
    for k in KS:
        assert re.search(rf"^\s*{k}\s+\d+\.\d+% ± +\d+\.\d+\s+\d+\.\d+% ± +\d+\.\d+\s*$", text, re.M), \
            f"no table row for k={k}\n{describe(proc)}"
    assert f"done: {ROUNDS} rounds" in text
    assert out in text


def test_metrics_file_layout(finished):
    cfg_path, overrides, out, _ = finished
    A = N - H
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        assert f.attrs["format"] == "mpifedmeta.metrics"
        assert int(f.attrs["format_version"]) == 1
        assert json.loads(f.attrs["config"]) == resolved_config(cfg_path, overrides)
        for a in ("mpifedmeta_version", "torch_version", "strategy", "num_params"):
            assert a in f.attrs, a
        d = int(f.attrs["num_params"])
        assert d == sum(int(np.prod(s)) for s in expected_param_shapes().values())

        t = f["train"]
        dtypes = {"round": np.int64, "train_loss": np.float64, "wall_time": np.float64, "round_time": np.float64,
                  "allreduce_time": np.float64, "bytes_allreduced": np.int64, "num_sampled": np.int64}
        for name, dt in dtypes.items():
            assert t[name].shape == (ROUNDS,), name
            assert t[name].dtype == dt, name
        assert t["round"][()].tolist() == list(range(1, ROUNDS + 1))
        assert np.all(t["num_sampled"][()] == K_PER_ROUND)
        assert np.all(np.isfinite(t["train_loss"][()])) and np.all(t["train_loss"][()] > 0)
        assert np.all(np.diff(t["wall_time"][()]) >= 0)
        assert np.all(t["round_time"][()] >= 0) and np.all(t["allreduce_time"][()] >= 0)
        # one int64 per parameter (the exact sum of displacements), 2 for the meta-loss, 1 for the bad count
        assert np.all(t["bytes_allreduced"][()] == 8 * (d + 3))

        e = f["eval"]
        K = len(KS)
        assert e.attrs["finetune_steps"].tolist() == KS
        rounds = [0] + list(range(EVERY, ROUNDS + 1, EVERY))
        if rounds[-1] != ROUNDS:
            rounds.append(ROUNDS)
        assert e["round"][()].tolist() == rounds == [0, 2, 4, 5]
        R = len(rounds)
        for name in ("train_loss_mean", "train_acc_mean", "holdout_loss_mean", "holdout_acc_mean"):
            assert e[name].shape == (R, K) and e[name].dtype == np.float64, name
        for name, n in (("train_agent_loss", A), ("train_agent_acc", A), ("holdout_agent_loss", H),
                        ("holdout_agent_acc", H)):
            assert e[name].shape == (R, K, n) and e[name].dtype == np.float32, name
        assert e["train_agent_ids"][()].tolist() == list(range(A))
        assert e["holdout_agent_ids"][()].tolist() == list(range(A, N))
        for name in ("train", "holdout"):
            acc = e[f"{name}_agent_acc"][()]
            assert np.all((acc >= 0) & (acc <= 1))
            np.testing.assert_allclose(e[f"{name}_acc_mean"][()], acc.astype(np.float64).mean(axis=2), atol=1e-6)
            np.testing.assert_allclose(e[f"{name}_loss_mean"][()],
                                       e[f"{name}_agent_loss"][()].astype(np.float64).mean(axis=2), rtol=1e-5)

        p = f["partition"]
        assert p["train_ptr"].shape == (N + 1,) and p["test_ptr"].shape == (N + 1,)
        assert p["holdout"].dtype == np.bool_ and p["holdout"][()].tolist() == [False] * A + [True] * H
        assert p["train_ptr"][-1] == p["train_idx"].shape[0]
        assert p["test_ptr"][-1] == p["test_idx"].shape[0]
        assert np.all(np.diff(p["train_ptr"][()]) > 0)
        used = np.concatenate([p["train_idx"][()], p["test_idx"][()]])
        assert len(np.unique(used)) == len(used), "a sample belongs to two agents / splits"
        assert p.attrs["dataset"] == "digits" and p.attrs["scheme"] == "shards"


def test_checkpoints_layout(finished):
    cfg_path, overrides, out, _ = finished
    rounds = checkpoint_rounds(out)
    assert rounds[0] == 0 and rounds[-1] == ROUNDS
    assert set(rounds) == {0, 2, 4, 5}
    shapes = expected_param_shapes()
    models = {}
    for r in (0, ROUNDS):
        with h5py.File(checkpoint_path(out, r), "r") as f:
            assert f.attrs["format"] == "mpifedmeta.checkpoint"
            assert int(f.attrs["format_version"]) == 1
            assert int(f.attrs["round"]) == r
            assert "wall_time" in f.attrs
            assert json.loads(f.attrs["config"]) == resolved_config(cfg_path, overrides)
            g = f["model"]
            assert {k: g[k].shape for k in g} == shapes
            assert all(g[k].dtype == np.float32 for k in g)
            models[r] = {k: g[k][()] for k in g}
            assert all(np.all(np.isfinite(v)) for v in models[r].values())
    assert any(not np.array_equal(models[0][k], models[ROUNDS][k]) for k in shapes), "training changed nothing"
    leftovers = [n for n in os.listdir(os.path.join(out, "checkpoints")) + os.listdir(out) if ".tmp" in n]
    assert leftovers == []


def test_run_into_existing_output_dir_exits_2_and_changes_nothing(finished, tmp_path):
    cfg_path, overrides, out, _ = finished
    out2 = copy_run(out, str(tmp_path / "again"))
    before = file_hashes(out2)
    proc = run_cli(["run", cfg_path] + overrides + sets(output__dir=out2))
    assert_one_error_line(proc, 2, out2, "resume")
    assert file_hashes(out2) == before


def test_report_writes_pngs(finished, tmp_path):
    _, _, out, _ = finished
    dest = str(tmp_path / "rep")
    before = file_hashes(out)
    proc = run_cli(["report", out, "--out", dest])
    assert_ok(proc)
    for name in ("accuracy.png", "loss.png", "distribution.png", "train_loss.png"):
        p = os.path.join(dest, name)
        assert os.path.isfile(p), describe(proc)
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert p in proc.stdout
    assert os.path.isfile(os.path.join(dest, "summary.md"))
    assert file_hashes(out) == before        # reporting never touches the run


def test_report_of_missing_run_exits_2(tmp_path):
    proc = run_cli(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "rep")])
    assert_one_error_line(proc, 2)


# --------------------------------------------------------------------------- bad input: exit 2, one line

def _bad_npz(tmp_path) -> str:
    p = tmp_path / "garbage.npz"
    p.write_bytes(b"this is not a zip file\n" * 10)
    return str(p)


BAD_CASES = {
    "nu<0": (lambda tp: sets(train__nu=-1), ["train.nu"]),
    "unknown key": (lambda tp: ["--set", "train.nuu=1"], ["train.nuu"]),
    "wrong type": (lambda tp: ["--set", "train.rounds=many"], ["train.rounds"]),
    "too many agents": (lambda tp: sets(train__agents_per_round=11), ["train.agents_per_round"]),
    "missing npz": (lambda tp: sets(data__dataset="npz", data__path=str(tp / "missing.npz")), ["missing.npz"]),
    "corrupt npz": (lambda tp: sets(data__dataset="npz", data__path=_bad_npz(tp)), ["garbage.npz"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path):
    cfg = write_tiny_config(tmp_path)
    make, needles = BAD_CASES[case]
    out = tmp_path / "out"
    proc = run_cli(["run", cfg] + sets(output__dir=str(out)) + make(tmp_path))
    assert_one_error_line(proc, 2, *needles)
    assert not (out / "metrics.h5").exists()


@pytest.mark.parametrize("case", ["nu<0", "unknown key", "corrupt npz"])
def test_bad_input_under_mpiexec_2_prints_once(case, tmp_path):
    cfg = write_tiny_config(tmp_path)
    make, needles = BAD_CASES[case]
    proc = run_cli(["run", cfg] + sets(output__dir=str(tmp_path / "out")) + make(tmp_path), np_=2)
    line = assert_one_error_line(proc, 2, *needles)
    assert proc.stderr.count("mpifedmeta: error:") == 1, describe(proc)
    assert "Traceback" not in proc.stderr and "[rank" not in line


def test_missing_config_file_exits_2(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert_one_error_line(run_cli(["run", missing]), 2, missing)


def test_bad_toml_exits_2(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train\nrounds = 3\n")
    assert_one_error_line(run_cli(["run", str(p)]), 2, str(p))


def test_resume_of_missing_dir_exits_2(tmp_path):
    missing = str(tmp_path / "norun")
    assert_one_error_line(run_cli(["resume", missing]), 2, missing)


def test_resume_negative_rounds_exits_2(finished):
    _, _, out, _ = finished
    assert_one_error_line(run_cli(["resume", out, "--rounds", "-1"]), 2, "--rounds")


def test_unknown_subcommand_is_a_usage_error():
    proc = run_cli(["frobnicate"])
    assert proc.returncode == 2
    assert "usage" in proc.stderr.lower()


# --------------------------------------------------------------------------- config, info, version

def test_config_subcommand_prints_a_valid_default_config(tmp_path):
    proc = run_cli(["config"])
    assert_ok(proc)
    for sec, keys in cfgmod.SCHEMA.items():
        assert f"[{sec}]" in proc.stdout
        for k, key in keys.items():
            unset = "# " if key.default is None else ""     # TOML has no null: unset keys are shown commented out
            assert re.search(rf"^{unset}{re.escape(k)} = ", proc.stdout, re.M), f"{sec}.{k}"
    parsed = tomllib.loads(proc.stdout)        # the listing is itself a TOML config of the defaults
    assert cfgmod.validate(parsed).raw == cfgmod.load(None).raw


def test_version():
    proc = run_cli(["--version"])
    assert_ok(proc)
    import mpifedmeta
    assert mpifedmeta.__version__ in proc.stdout


def test_info_serial():
    proc = run_cli(["info"])
    assert_ok(proc)
    assert "ranks: 1" in proc.stdout
    assert re.search(r"^rank\s+0\s", proc.stdout, re.M)
    assert "MPI:" in proc.stdout and "torch" in proc.stdout


def test_info_under_mpiexec_2_lists_2_ranks():
    proc = run_cli(["info"], np_=2)
    assert_ok(proc)
    assert "ranks: 2" in proc.stdout, describe(proc)
    rank_lines = re.findall(r"^rank\s+(\d+)\s", proc.stdout, re.M)
    assert sorted(rank_lines) == ["0", "1"], describe(proc)
    assert len(re.findall(r"^MPI: ", proc.stdout, re.M)) == 1       # header printed once, by rank 0

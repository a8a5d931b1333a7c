"""Resume, stop by signal, auto-resume, divergence, corrupt files, atomic writes, checkpoint pruning.

All serial: the CLI runs as subprocesses (some under mpiexec); the atomic-write tests call
mpifedmeta.storage.io in-process.
"""

import json
import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from helpers import (TIMEOUT, assert_models_identical, assert_ok, assert_one_error_line, arrays_identical,
                     checkpoint_path, checkpoint_rounds, cli_env, copy_run, describe, file_hashes, final_model,
                     mpifedmeta_cmd, read_metrics, run_cli, sets)
from mpifedmeta.storage import checkpoint, metrics

R = 6
BASE = sets(eval__every=2, output__checkpoint_every=1, output__keep=2)


@pytest.fixture(scope="module")
def straight(base_dir, cfg_path):
    """R = 6 rounds in one go (1 rank)."""
    out = str(base_dir / "straight")
    assert_ok(run_cli(["run", cfg_path] + BASE + sets(train__rounds=R, output__dir=out), np_=1))
    return out


@pytest.fixture(scope="module")
def partial(base_dir, cfg_path):
    """The same run stopped after 3 rounds (train.rounds = 3, 1 rank). Copy it before changing it."""
    out = str(base_dir / "partial3")
    assert_ok(run_cli(["run", cfg_path] + BASE + sets(train__rounds=3, output__dir=out), np_=1))
    return out


def assert_same_as_straight(out, straight, eval_rounds=(0, 2, 3, 4, 6)):
    assert_models_identical(final_model(straight), final_model(out), "resumed vs straight")
    assert checkpoint_rounds(out)[-1] == R
    a, b = read_metrics(straight), read_metrics(out)
    assert b["train/round"].tolist() == list(range(1, R + 1))          # no duplicate, no missing row
    for name in ("train/train_loss", "train/num_sampled", "train/bytes_allreduced"):
        assert arrays_identical(a[name], b[name]), name
    assert np.all(np.diff(b["train/wall_time"]) >= 0)
    assert b["eval/round"].tolist() == list(eval_rounds)
    # the rows that both runs evaluated are identical
    rows_b = [list(eval_rounds).index(r) for r in a["eval/round"].tolist()]
    for name in ("eval/train_agent_acc", "eval/train_agent_loss", "eval/holdout_agent_acc", "eval/train_acc_mean"):
        assert arrays_identical(a[name], b[name][rows_b]), name
    for name in ("partition/train_idx", "partition/test_idx", "eval/train_agent_ids"):
        assert arrays_identical(a[name], b[name]), name


# --------------------------------------------------------------------------- resume == straight

def test_straight_run_layout(straight):
    m = read_metrics(straight)
    assert m["train/round"].tolist() == list(range(1, R + 1))
    assert m["eval/round"].tolist() == [0, 2, 4, 6]


def test_keep_2_leaves_round_0_and_the_last_two(straight):
    assert checkpoint_rounds(straight) == [0, R - 1, R]
    assert not [n for n in os.listdir(os.path.join(straight, "checkpoints")) if not n.endswith(".h5")]


def test_resume_is_bit_identical_to_straight_run(straight, partial, tmp_path):
    out = copy_run(partial, str(tmp_path / "p"))
    assert checkpoint_rounds(out)[-1] == 3
    proc = run_cli(["resume", out, "--rounds", str(R)])
    assert_ok(proc)
    assert "resuming" in proc.stdout and "round 3" in proc.stdout
    assert_same_as_straight(out, straight)
    assert checkpoint_rounds(out) == [0, R - 1, R]
    with h5py.File(checkpoint_path(out, R), "r") as f:
        assert json.loads(f.attrs["config"])["train"]["rounds"] == R


def test_resume_on_more_ranks_is_bit_identical(straight, partial, tmp_path):
    out = copy_run(partial, str(tmp_path / "p"))
    proc = run_cli(["resume", out, "--rounds", str(R)], np_=2)
    assert_ok(proc)
    assert "on 2 rank(s)" in proc.stdout
    assert_same_as_straight(out, straight)


def test_resume_of_finished_run_is_a_no_op(straight, tmp_path):
    out = copy_run(straight, str(tmp_path / "s"))
    # a crash can leave '.round_NNNNNN.h5.tmp-PID' behind: never taken for a checkpoint
    with open(os.path.join(out, "checkpoints", ".round_000009.h5.tmp-12345"), "wb") as fh:
        fh.write(b"half written")
    assert checkpoint.list_all(out)[-1][0] == R
    before = file_hashes(out)
    proc = run_cli(["resume", out])
    assert_ok(proc)
    assert "already complete" in proc.stdout
    assert file_hashes(out) == before


def test_resume_rounds_before_checkpoint_exits_2(straight, tmp_path):
    out = copy_run(straight, str(tmp_path / "s"))
    before = file_hashes(out)
    assert_one_error_line(run_cli(["resume", out, "--rounds", "2"]), 2, "--rounds 2")
    assert file_hashes(out) == before


# --------------------------------------------------------------------------- --auto-resume

def test_auto_resume_on_finished_run_is_a_no_op(straight, cfg_path, tmp_path):
    out = copy_run(straight, str(tmp_path / "s"))
    before = file_hashes(out)
    proc = run_cli(["run", cfg_path, "--auto-resume"] + BASE + sets(train__rounds=R, output__dir=out))
    assert_ok(proc)
    assert "already complete" in proc.stdout
    assert file_hashes(out) == before


def test_auto_resume_on_partial_run_resumes(straight, partial, cfg_path, tmp_path):
    out = copy_run(partial, str(tmp_path / "p"))
    proc = run_cli(["run", cfg_path, "--auto-resume"] + BASE + sets(train__rounds=R, output__dir=out), np_=3)
    assert_ok(proc)
    assert "resuming" in proc.stdout
    assert_same_as_straight(out, straight)


def test_auto_resume_with_a_different_config_exits_2(partial, cfg_path, tmp_path):
    out = copy_run(partial, str(tmp_path / "p"))
    before = file_hashes(out)
    proc = run_cli(["run", cfg_path, "--auto-resume"] + BASE + sets(train__rounds=R, train__nu=1, output__dir=out))
    assert_one_error_line(proc, 2, "train.nu")
    assert file_hashes(out) == before


def _drop_config_keys(path, keys):
    with h5py.File(path, "r+") as f:
        cfg = json.loads(f.attrs["config"])
        for section, key in keys:
            cfg[section].pop(key, None)
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)


def test_auto_resume_accepts_a_run_made_before_keys_were_added(straight, cfg_path, tmp_path):
    """A run written by an older version lacks keys added since; they compare at their defaults."""
    out = copy_run(straight, str(tmp_path / "old"))
    newer = [("train", "agent_chunk"), ("train", "allow_tf32"), ("eval", "holdout_agents")]
    for path in [os.path.join(out, "metrics.h5")] + [checkpoint_path(out, r) for r in checkpoint_rounds(out)]:
        _drop_config_keys(path, newer)
    before = file_hashes(out)
    proc = run_cli(["run", cfg_path, "--auto-resume"] + BASE + sets(train__rounds=R, output__dir=out))
    assert_ok(proc)
    assert "already complete" in proc.stdout
    assert file_hashes(out) == before


# --------------------------------------------------------------------------- stop by signal, then resume

ROUNDS_TO_SIGNAL = 20000

def test_sigterm_stops_with_exit_3_and_resume_completes(cfg_path, tmp_path):
    killed = str(tmp_path / "killed")
    # cheap rounds, but so many that they cannot all finish before the signal; eval every 4. keep=2
    # prunes old checkpoints, so wait for any checkpoint after round 0, not for round 2's file.
    cheap = sets(train__local_steps=1, train__agents_per_round=2, eval__every=4, output__checkpoint_every=2,
                 output__keep=2)
    cmd = mpifedmeta_cmd(["run", cfg_path] + cheap + sets(train__rounds=ROUNDS_TO_SIGNAL, output__dir=killed), 2)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())

    def past_round_0() -> bool:
        return os.path.isdir(os.path.join(killed, "checkpoints")) and any(r >= 2 for r in checkpoint_rounds(killed))

    try:
        deadline = time.perf_counter() + 90
        while not past_round_0() and proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert past_round_0(), "no checkpoint after round 0 within 90 s"
        t_sig = time.perf_counter()
        proc.send_signal(signal.SIGTERM)                   # to mpiexec; hydra forwards it to the ranks
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    t_stop = time.perf_counter() - t_sig
    print(f"\nSIGTERM to mpiexec -n 2 after {t_sig - t0:.1f} s: exit code {proc.returncode}, {t_stop:.2f} s later")
    assert proc.returncode == 3, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    assert "stop requested (SIGTERM)" in stderr
    assert stderr.count("stop requested") == 1                 # rank 0 only
    k = checkpoint_rounds(killed)[-1]
    assert 2 <= k < ROUNDS_TO_SIGNAL
    assert f"checkpoint of round {k}" in stderr
    m = read_metrics(killed)
    assert m["train/round"].tolist() == list(range(1, k + 1))     # rows up to the stop round, no more

    target = k + 3
    proc = run_cli(["resume", killed, "--rounds", str(target)], np_=2)
    assert_ok(proc)
    ref = str(tmp_path / "ref")
    assert_ok(run_cli(["run", cfg_path] + cheap + sets(train__rounds=target, output__dir=ref)))
    assert_models_identical(final_model(ref), final_model(killed), "killed+resumed vs uninterrupted")
    a, b = read_metrics(ref), read_metrics(killed)
    assert b["train/round"].tolist() == list(range(1, target + 1))
    assert arrays_identical(a["train/train_loss"], b["train/train_loss"])
    assert arrays_identical(a["eval/round"], b["eval/round"])
    assert arrays_identical(a["eval/train_agent_acc"], b["eval/train_agent_acc"])
    print(f"stopped at round {k}, resumed to {target}: bit-identical to the uninterrupted run")


# --------------------------------------------------------------------------- divergence

@pytest.mark.parametrize("beta, nprocs", [(1e6, 1), (100.0, 2)])
def test_divergence_exits_4_and_keeps_a_finite_checkpoint(beta, nprocs, cfg_path, tmp_path):
    out = str(tmp_path / "nan")
    proc = run_cli(["run", cfg_path] + sets(train__rounds=6, train__beta=beta, output__checkpoint_every=1,
                                            output__dir=out), np_=nprocs)
    assert proc.returncode == 4, describe(proc)
    assert "diverged" in proc.stderr
    assert proc.stderr.count("diverged") == 1
    r = int(re.search(r"diverged in round (\d+)", proc.stderr).group(1))
    rounds = checkpoint_rounds(out)
    assert rounds[-1] == r - 1, (rounds, r)
    round_, params, _, _ = checkpoint.read(checkpoint_path(out, rounds[-1]))
    assert round_ == r - 1
    assert all(np.all(np.isfinite(v)) and np.all(np.abs(v) < 65536) for v in params.values())
    m = read_metrics(out)
    assert m["train/round"].tolist() == list(range(1, r))
    assert np.all(np.isfinite(m["train/train_loss"]))
    print(f"\nbeta={beta}: diverged in round {r}, exit 4, last checkpoint round {rounds[-1]} finite")


# --------------------------------------------------------------------------- corrupt files: exit 2, nothing changed

def _truncate_newest(out):
    p = checkpoint_path(out, checkpoint_rounds(out)[-1])
    size = os.path.getsize(p)
    with open(p, "r+b") as fh:
        fh.truncate(size // 2)
    return os.path.basename(p)


def _garbage_round_10(out):
    with open(checkpoint_path(out, 10), "wb") as fh:
        fh.write(b"not an HDF5 file at all\n" * 50)
    return "round_000010.h5"


def _wrong_metrics_format(out):
    with h5py.File(os.path.join(out, "metrics.h5"), "r+") as f:
        f.attrs["format"] = "someone.elses.format"
    return "metrics.h5"


def _checkpoint_config_differs(out):
    p = checkpoint_path(out, checkpoint_rounds(out)[-1])
    with h5py.File(p, "r+") as f:
        cfg = json.loads(f.attrs["config"])
        cfg["train"]["nu"] = cfg["train"]["nu"] + 1
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)
    return os.path.basename(p)


def _metrics_missing(out):
    os.remove(os.path.join(out, "metrics.h5"))
    return "metrics.h5"


def _no_checkpoints(out):
    for r in checkpoint_rounds(out):
        os.remove(checkpoint_path(out, r))
    return "checkpoints"


CORRUPTIONS = {"truncated newest checkpoint": _truncate_newest, "non-HDF5 round_000010.h5": _garbage_round_10,
               "metrics format attr": _wrong_metrics_format, "checkpoint config differs": _checkpoint_config_differs,
               "metrics.h5 missing": _metrics_missing, "no checkpoints": _no_checkpoints}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_resume_of_corrupt_run_exits_2_and_changes_nothing(case, straight, tmp_path):
    out = copy_run(straight, str(tmp_path / "c"))
    name = CORRUPTIONS[case](out)
    before = file_hashes(out)
    proc = run_cli(["resume", out, "--rounds", "8"])
    line = assert_one_error_line(proc, 2, name)
    assert "Traceback" not in proc.stderr
    if case == "checkpoint config differs":
        assert "train.nu" in line
    assert file_hashes(out) == before, "resume changed files of a run it refused"


def test_resume_of_corrupt_run_under_mpiexec_2(straight, tmp_path):
    out = copy_run(straight, str(tmp_path / "c"))
    name = _truncate_newest(out)
    before = file_hashes(out)
    proc = run_cli(["resume", out, "--rounds", "8"], np_=2)
    assert_one_error_line(proc, 2, name)
    assert file_hashes(out) == before


# --------------------------------------------------------------------------- interrupted writes (in-process)

def _no_temp_files(out):
    names = os.listdir(out) + os.listdir(os.path.join(out, "checkpoints"))
    return [n for n in names if ".tmp" in n]


def test_interrupted_checkpoint_write_keeps_the_previous_file(straight, tmp_path, monkeypatch):
    out = copy_run(straight, str(tmp_path / "w"))
    last = checkpoint_rounds(out)[-1]
    path = checkpoint_path(out, last)
    round_, params, cfg_json, attrs = checkpoint.read(path)
    before = file_hashes(out)
    calls = []

    def boom(src, dst, *a, **kw):
        calls.append(dst)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    changed = {k: v + 1 for k, v in params.items()}
    with pytest.raises(OSError):
        checkpoint.write(out, last, changed, cfg_json, {"wall_time": 9.0}, keep=2)       # overwrite
    with pytest.raises(OSError):
        checkpoint.write(out, last + 1, changed, cfg_json, {"wall_time": 9.0}, keep=2)   # a new round
    monkeypatch.undo()
    assert calls == [path, checkpoint_path(out, last + 1)]
    assert file_hashes(out) == before                     # nothing replaced, nothing pruned
    assert _no_temp_files(out) == []
    r2, p2, c2, _ = checkpoint.read(path)
    assert r2 == round_ and c2 == cfg_json
    assert_models_identical(params, p2)


def test_interrupted_metrics_append_keeps_the_previous_file(straight, tmp_path, monkeypatch):
    out = copy_run(straight, str(tmp_path / "w"))
    train, ev = metrics.read(out, tables=True).tables["train"], metrics.read(out, tables=True).tables["eval"]
    train_row = {k: v[-1] for k, v in train.items()}
    train_row["round"] = int(train["round"][-1]) + 1
    eval_row = {k: v[-1] for k, v in ev.items() if not k.endswith("_ids")}
    eval_row["round"] = train_row["round"]
    before = file_hashes(out)
    calls = []

    def boom(src, dst, *a, **kw):
        calls.append(dst)
        raise OSError(5, "I/O error (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        metrics.append(out, [train_row], [eval_row])
    with pytest.raises(OSError):
        metrics.truncate(out, 2)
    monkeypatch.undo()
    assert calls == [metrics.path_of(out)] * 2
    assert file_hashes(out) == before
    assert _no_temp_files(out) == []
    assert metrics.read(out, tables=True).tables["train"]["round"].tolist() == list(range(1, R + 1))
    # and with a working rename the same append succeeds
    metrics.append(out, [train_row], [eval_row])
    assert metrics.read(out, tables=True).tables["train"]["round"].tolist() == list(range(1, R + 2))
    assert metrics.read(out, tables=True).tables["eval"]["round"].tolist()[-1] == R + 1
    assert _no_temp_files(out) == []

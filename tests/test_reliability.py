"""Reliability (issue 12): the output lock, resume that checks before it cuts, bounded reads of hostile
files, absurd sizes refused before allocation, disk full, hostile inputs, signals, the MPI launcher.

The CLI runs as subprocesses (some under mpiexec); processes that could allocate absurd amounts run
under an address-space limit so that a regression fails the test instead of the machine.
"""

import errno
import hashlib
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest

from helpers import (BIN, REPO, TIMEOUT, arrays_identical, assert_models_identical, assert_ok, assert_one_error_line,
                     checkpoint_path, checkpoint_rounds, cli_env, copy_run, describe, final_model,
                     mpiexec_command, mpifedmeta_cmd, read_metrics, run_cli, sets, write_tiny_config)
from mpifedmeta.storage import checkpoint, files, lock, metrics
from mpifedmeta.data import DataError, load_dataset

R = 6
BASE = sets(eval__every=2, output__checkpoint_every=2, output__keep=5)
AS_LIMIT = 2 << 30          # address space of a limited CLI process (a normal tiny run needs < 1 GB resident)


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_limited(args, np_=None, env=None, timeout=TIMEOUT):
    """run_cli under an address-space limit: reading or allocating gigabytes fails instead of succeeding."""
    t0 = time.perf_counter()
    proc = subprocess.run(mpifedmeta_cmd(args, np_), capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env), cwd=REPO, preexec_fn=_limited)
    proc.elapsed = time.perf_counter() - t0
    return proc


def snapshot(root):
    """sha256 and mtime of every file under ``root`` (FIFOs by type only, never opened): a refused
    command must change neither. The lock file is compared by content only (taking the lock
    writes the holder into it; releasing it empties it again)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = "fifo"
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(p, root)] = (digest, None if name == lock.LOCK_NAME else st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(base_dir, cfg_path):
    """R = 6 rounds, checkpoints 0, 2, 4, 6, evaluations 0, 2, 4, 6."""
    out = str(base_dir / "finished")
    assert_ok(run_cli(["run", cfg_path] + BASE + sets(train__rounds=R, output__dir=out)))
    return out


@pytest.fixture
def cut(finished, tmp_path):
    """A copy of the finished run whose newest checkpoint is round 4 while metrics.h5 has rows to 6
    (as after a crash between the metrics write and the checkpoint): a resume must drop rows 5, 6."""
    out = copy_run(finished, str(tmp_path / "cut"))
    os.remove(checkpoint_path(out, R))
    return out


# --------------------------------------------------------------------------- 1. the output lock

def test_run_and_resume_refused_while_another_process_holds_the_lock(finished, cfg_path, tmp_path):
    out = copy_run(finished, str(tmp_path / "held"))
    new = str(tmp_path / "new")
    os.makedirs(new)
    before = snapshot(out)
    with lock.OutputLock(out), lock.OutputLock(new):
        for args in (["resume", out, "--rounds", "8"], ["run", cfg_path, "--auto-resume"] + BASE
                     + sets(train__rounds=8, output__dir=out), ["run", cfg_path] + sets(output__dir=new)):
            proc = run_cli(args)
            line = assert_one_error_line(proc, 2, "in use by another mpifedmeta run",
                                         f"host {socket.gethostname()}", f"PID {os.getpid()}")
            assert "gone" not in line
        after = snapshot(out)
        assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    assert os.listdir(new) == [".lock"]
    with open(os.path.join(out, ".lock")) as fh:
        assert fh.read() == ""                          # emptied when released


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = str(tmp_path / "o")
    code = (f"import sys, time; sys.path.insert(0, {REPO!r}); from mpifedmeta.storage import lock; "
            f"l = lock.OutputLock({out!r}); l.acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.LockError, match=f"PID {holder.pid}"):
            lock.OutputLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    second = lock.OutputLock(out)
    second.acquire()                                    # SIGKILL released it: no stale lock on a local disk
    second.release()


def test_two_concurrent_runs_on_one_output_dir(cfg_path, tmp_path):
    out = str(tmp_path / "race")
    cmd = mpifedmeta_cmd(["run", cfg_path] + BASE + sets(train__rounds=R, output__dir=out))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
             for _ in range(2)]
    results = [p.communicate(timeout=TIMEOUT) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, e[-500:]) for p, (_, e) in zip(procs, results)]
    loser = results[[p.returncode for p in procs].index(2)][1]
    assert ("in use by another mpifedmeta run" in loser) or ("already holds a run" in loser), loser
    m = read_metrics(out)
    assert m["train/round"].tolist() == list(range(1, R + 1))       # no duplicated or mixed rows
    assert m["eval/round"].tolist() == [0, 2, 4, 6]


def test_lock_held_under_mpiexec_2_exits_2_on_every_rank(finished, tmp_path):
    out = copy_run(finished, str(tmp_path / "held"))
    with lock.OutputLock(out):
        proc = run_cli(["resume", out, "--rounds", "8"], np_=2)
    assert_one_error_line(proc, 2, "in use by another mpifedmeta run")


# --------------------------------------------------------------------------- 2. resume checks everything, then cuts

def _round_attr_wrong(out):
    with h5py.File(checkpoint_path(out, 4), "r+") as f:
        f.attrs["round"] = 3
    return "round attribute 3"


def _shape_wrong(out):
    with h5py.File(checkpoint_path(out, 4), "r+") as f:
        name = sorted(f["model"])[0]
        shape = f["model"][name].shape
        del f["model"][name]
        f["model"].create_dataset(name, data=np.zeros((shape[0] + 1,) + shape[1:], np.float32))
    return name


def _dtype_wrong(out):
    with h5py.File(checkpoint_path(out, 4), "r+") as f:
        name = sorted(f["model"])[0]
        data = f["model"][name][()]
        del f["model"][name]
        f["model"].create_dataset(name, data=data.astype(np.float64))
    return "float64"


def _metrics_short(out):
    with h5py.File(metrics.path_of(out), "r+") as f:
        for name in metrics.TRAIN_COLUMNS:
            f["train"][name].resize(2, axis=0)
    return "rounds 1..4"


VALIDATION = {"round attribute": _round_attr_wrong, "parameter shape": _shape_wrong,
              "parameter dtype": _dtype_wrong, "metrics rows missing": _metrics_short}


@pytest.mark.parametrize("case", list(VALIDATION))
def test_refused_resume_changes_no_file(case, cut):
    text = VALIDATION[case](cut)
    before = snapshot(cut)
    time.sleep(0.01)
    proc = run_cli(["resume", cut, "--rounds", "8"])
    assert_one_error_line(proc, 2, text)
    assert snapshot(cut) == before, "a refused resume changed files (bytes or mtimes)"


def test_resume_of_cut_run_drops_rows_then_continues(cut, finished):
    proc = run_cli(["resume", cut])
    assert_ok(proc)
    assert "dropped 3 metrics rows" in proc.stdout
    assert_models_identical(final_model(finished), final_model(cut))
    assert read_metrics(cut)["train/round"].tolist() == list(range(1, R + 1))


# --------------------------------------------------------------------------- 3. declared-huge checkpoint

def _declare_huge(path):
    """Replace the first parameter by an unwritten (10**9,) float32 dataset: a small file declaring 4 GB."""
    with h5py.File(path, "r+") as f:
        name = sorted(f["model"])[0]
        del f["model"][name]
        f["model"].create_dataset(name, shape=(10 ** 9,), dtype=np.float32, chunks=(1 << 16,))
    assert os.path.getsize(path) < 1 << 20
    return name


@pytest.mark.parametrize("rounds", [None, 8], ids=["complete run", "resumed run"])
def test_declared_huge_checkpoint_refused_without_reading_it(rounds, finished, tmp_path):
    out = copy_run(finished, str(tmp_path / "huge"))
    name = _declare_huge(checkpoint_path(out, R))
    before = snapshot(out)
    proc = run_limited(["resume", out] + (["--rounds", str(rounds)] if rounds else []))
    line = assert_one_error_line(proc, 2, name)
    assert "1000000000" in line
    assert snapshot(out) == before


# --------------------------------------------------------------------------- 4. absurd sizes, 8. keys named

ABSURD = {
    "train.nu": sets(train__nu=10 ** 8),
    "eval.finetune_steps": sets(eval__finetune_steps=[0, 10 ** 12]),
    "train.batch_size": sets(train__batch_size=10 ** 9),
    "model.hidden": sets(model__hidden=[10 ** 9]),
    "train.seed": ["--set", "train.seed=99999999999999999999999"],
    "train.rounds": ["--set", "train.rounds=99999999999999999999999"],
    "train.alpha": ["--set", "train.alpha=inf"],
    "train.threads": sets(train__threads=10 ** 8),
}


@pytest.mark.parametrize("key", list(ABSURD))
def test_absurd_value_exits_2_naming_the_key(key, cfg_path, tmp_path):
    out = str(tmp_path / "out")
    proc = run_limited(["run", cfg_path] + ABSURD[key] + sets(output__dir=out))
    line = assert_one_error_line(proc, 2, key)
    assert "scikit-learn" not in line and "C long" not in line
    assert not os.path.exists(out)


def test_overflowing_integer_in_the_toml_file_names_its_key(tmp_path):
    cfg = write_tiny_config(tmp_path, open(write_tiny_config(tmp_path / "t")).read().replace(
        "nu = 2", "nu = 99999999999999999999"))
    assert_one_error_line(run_cli(["run", cfg] + sets(output__dir=str(tmp_path / "o"))), 2, "train.nu", "64 bits")


def _npy_bytes(shape, dtype="<f4", payload=b"\0" * 64):
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def test_npz_header_declaring_a_huge_shape_is_refused_before_loading(tmp_path):
    path = str(tmp_path / "huge.npz")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", _npy_bytes((10 ** 9, 784)))
        z.writestr("y.npy", _npy_bytes((4,), "<i8", np.arange(4, dtype="<i8").tobytes()))
    assert os.path.getsize(path) < 4096
    with pytest.raises(DataError, match="key 'x' declares shape"):
        load_dataset("npz", path)


def test_npz_labels_of_a_billion_are_refused_naming_the_key(tmp_path):
    path = str(tmp_path / "labels.npz")
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(40, 4)).astype(np.float32), y=np.array([0, 1] * 19 + [2, 10 ** 9]))
    proc = run_limited(["run", write_tiny_config(tmp_path)] + sets(
        data__dataset="npz", data__path=path, data__num_agents=4, data__holdout_agents=0,
        data__partition="iid", train__agents_per_round=2, output__dir=str(tmp_path / "o")))
    assert_one_error_line(proc, 2, "key 'y'", "1000000001 classes")


def test_non_zip_npz_is_named_as_such_not_as_pickled_data(tmp_path):
    path = str(tmp_path / "text.npz")
    with open(path, "w") as fh:
        fh.write("x,y\n1,2\n")
    with pytest.raises(DataError) as e:
        load_dataset("npz", path)
    assert "not a zip archive" in str(e.value) and "pickle" not in str(e.value)


# --------------------------------------------------------------------------- 5. disk full

def _no_temp_files(out):
    return [n for d in (out, os.path.join(out, "checkpoints")) if os.path.isdir(d) for n in os.listdir(d) if ".tmp" in n]


@pytest.mark.parametrize("np_", [None, 2], ids=["1 rank", "mpiexec -n 2"])
def test_injected_disk_full_exits_5_and_keeps_the_previous_checkpoint(np_, cfg_path, finished, tmp_path):
    out = str(tmp_path / "full")
    proc = run_cli(["run", cfg_path] + BASE + sets(train__rounds=R, output__dir=out), np_=np_,
                   env={"MPIFEDMETA_INJECT_ENOSPC": "round_000004"})
    line = assert_one_error_line(proc, 5, "no space left on", "while writing", "round_000004.h5")
    assert "Traceback" not in proc.stderr
    assert _no_temp_files(out) == []
    assert checkpoint_rounds(out) == [0, 2]
    _, params, _, _ = checkpoint.read(checkpoint_path(out, 2))        # intact
    assert read_metrics(out)["train/round"].tolist() == [1, 2, 3, 4]    # rows before the checkpoint, resume cuts them
    assert_ok(run_cli(["resume", out]))
    assert_models_identical(final_model(finished), final_model(out), "resumed after disk full vs straight")
    print(f"\n{line}")


def test_injected_disk_full_on_metrics_exits_5(cfg_path, tmp_path):
    out = str(tmp_path / "full")
    proc = run_cli(["run", cfg_path] + sets(output__dir=out), env={"MPIFEDMETA_INJECT_ENOSPC": "metrics.h5"})
    assert_one_error_line(proc, 5, "no space left on", "metrics.h5")
    assert _no_temp_files(out) == []


def test_disk_full_on_a_small_tmpfs(cfg_path, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        out = str(mnt / "run")
        proc = run_cli(["run", cfg_path] + sets(train__rounds=400, train__local_steps=1, eval__every=1000,
                                                output__checkpoint_every=1, output__keep=1000, output__dir=out))
        line = assert_one_error_line(proc, 5, "no space left on tmpfs", str(mnt))
        assert _no_temp_files(out) == []
        last = checkpoint_rounds(out)[-1]
        assert last > 0 and checkpoint.read(checkpoint_path(out, last))[0] == last
        print(f"\n{line} (after round {last})")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_stale_temp_files_of_dead_runs_are_removed_at_resume(cut):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [os.path.join(cut, "checkpoints", f".round_000005.h5.tmp-{dead}"), os.path.join(cut, f".metrics.h5.tmp-{dead}")]
    live = os.path.join(cut, "checkpoints", f".round_000005.h5.tmp-{os.getpid()}")
    for p in stale + [live]:
        with open(p, "wb") as fh:
            fh.write(b"x" * 1000)
    assert_ok(run_cli(["resume", cut]))
    assert not any(os.path.exists(p) for p in stale)
    assert os.path.exists(live)                         # a running process's file is not ours to remove


def test_disk_full_error_is_one_line_naming_device_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIFEDMETA_INJECT_ENOSPC", "round_000001")
    with pytest.raises(files.DiskFull) as e:
        checkpoint.write(str(tmp_path), 1, {"w": np.zeros(3, np.float32)}, "{}", {}, keep=2)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).startswith("no space left on ") and "(mounted on " in str(e.value)
    assert str(e.value).endswith(checkpoint_path(str(tmp_path), 1)) and "\n" not in str(e.value)
    assert _no_temp_files(str(tmp_path)) == []


# --------------------------------------------------------------------------- 6. hostile inputs: one line, exit 2

def _fifo(path):
    os.mkfifo(path)
    return path


def test_config_not_utf8_not_toml_or_a_fifo(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[train]\nnu = 1 # \xe9t\xe9\n")
    assert_one_error_line(run_cli(["run", str(bad)]), 2, "not UTF-8", "0xe9")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(1, 128)) * 4)
    assert_one_error_line(run_cli(["run", str(binary)]), 2, "invalid TOML")
    fifo = _fifo(str(tmp_path / "fifo.toml"))
    proc = run_cli(["run", fifo], timeout=60)
    assert_one_error_line(proc, 2, "not a regular file")


@pytest.mark.parametrize("value, text", [("", "output.dir is empty"), ("/dev/null/run", "/dev/null is not a directory"),
                                         ("FILE", "exists and is not a directory")])
def test_bad_output_dir_detected_before_any_setup(value, text, cfg_path, tmp_path):
    if value == "FILE":
        value = str(tmp_path / "afile")
        open(value, "w").close()
    proc = run_cli(["run", cfg_path] + sets(output__dir=value))
    assert_one_error_line(proc, 2, text)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_dir(cfg_path, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert_one_error_line(run_cli(["run", cfg_path] + sets(output__dir=str(ro / "x"))), 2, "not writable")


def _ckpt_round_string(out):
    with h5py.File(checkpoint_path(out, R), "r+") as f:
        f.attrs["round"] = "six"
    return "attribute 'round' must be an integer"


def _ckpt_config_not_json(out):
    with h5py.File(checkpoint_path(out, R), "r+") as f:
        f.attrs["config"] = "{not json"
    return "not valid JSON"


def _ckpt_model_not_group(out):
    with h5py.File(checkpoint_path(out, R), "r+") as f:
        del f["model"]
        f["model"] = np.zeros(3)
    return "'model' is missing or not a group"


def _metrics_round_not_dataset(out):
    with h5py.File(metrics.path_of(out), "r+") as f:
        del f["train/round"]
        f["train"].create_group("round")
    return "train/round is missing or not a table column"


def _metrics_config_not_json(out):
    with h5py.File(metrics.path_of(out), "r+") as f:
        f.attrs["config"] = "[1, 2"
    return "not valid JSON"


def _ckpt_fifo(out):
    os.remove(checkpoint_path(out, R))
    _fifo(checkpoint_path(out, R))
    return "not a regular file"


def _metrics_fifo(out):
    os.remove(metrics.path_of(out))
    _fifo(metrics.path_of(out))
    return "not a regular file"


MALFORMED = {"round not an integer": _ckpt_round_string, "checkpoint config not JSON": _ckpt_config_not_json,
             "model not a group": _ckpt_model_not_group, "metrics round not a dataset": _metrics_round_not_dataset,
             "metrics config not JSON": _metrics_config_not_json, "checkpoint is a FIFO": _ckpt_fifo,
             "metrics.h5 is a FIFO": _metrics_fifo}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_output_files_exit_2(case, finished, tmp_path):
    out = copy_run(finished, str(tmp_path / "m"))
    text = MALFORMED[case](out)
    before = snapshot(out)
    proc = run_cli(["resume", out, "--rounds", "8"], timeout=60)
    assert_one_error_line(proc, 2, text)
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before


def test_npz_data_path_is_a_fifo(tmp_path):
    fifo = _fifo(str(tmp_path / "data.npz"))
    proc = run_cli(["run", write_tiny_config(tmp_path)] + sets(data__dataset="npz", data__path=fifo,
                                                               output__dir=str(tmp_path / "o")), timeout=60)
    assert_one_error_line(proc, 2, "not a regular file")


def test_newline_in_a_set_value_is_refused_not_dropped(cfg_path, tmp_path):
    for value in ("train.nu=3\n[data]\nnum_agents=5", f'output.dir="{tmp_path}/a"\n'):
        proc = run_cli(["run", cfg_path, "--set", value])
        assert_one_error_line(proc, 2, "line break")


# --------------------------------------------------------------------------- 7. a second signal changes nothing

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_second_quick_signal_keeps_exit_3(sig, cfg_path, tmp_path):
    out = str(tmp_path / "twice")
    cmd = mpifedmeta_cmd(["run", cfg_path] + sets(train__rounds=20000, train__local_steps=1, output__dir=out))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        deadline = time.time() + 90
        while not os.path.exists(checkpoint_path(out, 0)) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        for line in proc.stderr:
            if "stop requested" in line:
                time.sleep(0.1)             # the process is exiting: Python has restored the default handlers
                proc.send_signal(sig)
                break
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, f"exit {proc.returncode}"
    assert checkpoint.read(checkpoint_path(out, checkpoint_rounds(out)[-1]))[0] == checkpoint_rounds(out)[-1]


# --------------------------------------------------------------------------- 9. the MPI launcher

def test_helpers_launcher_honours_MPIEXEC(monkeypatch):
    monkeypatch.setenv("MPIEXEC", "/opt/mpi/bin/mpirun --oversubscribe")
    assert mpiexec_command() == ["/opt/mpi/bin/mpirun", "--oversubscribe"]
    monkeypatch.delenv("MPIEXEC")
    venv = os.path.join(BIN, "mpiexec")
    assert mpiexec_command() == ([venv] if os.path.exists(venv) else [shutil.which("mpiexec") or "mpiexec"])


def test_run_sh_uses_MPIEXEC(tmp_path):
    fake = tmp_path / "fake-mpirun"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/calls\n')
    fake.chmod(0o755)
    env = cli_env({"MPIEXEC": f"{fake} --flag"})
    proc = subprocess.run(["bash", "tests/run.sh", "tests/test_reliability.py", "-k", "launcher_honours"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, describe(proc)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split(" python")[0] for c in calls] == ["--flag -n 2 bash tests/rank0_prints.sh", "--flag -n 3 bash tests/rank0_prints.sh"]


# --------------------------------------------------------------------------- 10. stop checkpoint at once

def test_stop_signal_checkpoints_the_last_completed_round_at_once(cfg_path, finished, tmp_path):
    """A launcher that SIGKILLs ~1 s after SIGTERM (Open MPI's mpirun) in the middle of a long round:
    the checkpoint of the last completed round is on disk within a second, and resuming from it is
    bit-identical to the uninterrupted run."""
    out = str(tmp_path / "slow")
    cmd = mpifedmeta_cmd(["run", cfg_path] + BASE + sets(train__rounds=R, output__checkpoint_every=100,
                                                         output__progress_every=1, output__dir=out))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env({"MPIFEDMETA_INJECT_SLEEP": "4:120"}))
    try:
        for line in proc.stdout:
            if line.startswith("round 3/"):
                break
        time.sleep(0.5)                                 # inside round 4's 120 s
        assert checkpoint_rounds(out) == [0]
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        while checkpoint_rounds(out)[-1] != 3 and time.perf_counter() - t0 < 5:
            time.sleep(0.02)
        latency = time.perf_counter() - t0
        proc.kill()                                     # what mpirun does ~1 s later
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"\ncheckpoint of round 3 on disk {latency:.2f} s after SIGTERM (round 4 still running)")
    assert checkpoint_rounds(out) == [0, 3] and latency < 1.0
    assert_ok(run_cli(["resume", out]))
    assert_models_identical(final_model(finished), final_model(out), "stopped at once + resumed vs straight")
    a, b = read_metrics(finished), read_metrics(out)
    assert b["train/round"].tolist() == list(range(1, R + 1))
    assert arrays_identical(a["train/train_loss"], b["train/train_loss"])
    assert arrays_identical(a["eval/train_agent_acc"], b["eval/train_agent_acc"])


# --------------------------------------------------------------------------- in-process, any number of ranks

def _mpi_world():
    from mpi4py import MPI
    from mpifedmeta.parallel.dist import World
    comm = MPI.COMM_WORLD
    return World(comm, comm.Get_rank(), comm.Get_size(), local_rank=comm.Get_rank(), local_size=comm.Get_size())


@pytest.mark.mpi
def test_agreed_gives_every_rank_the_same_outcome():
    from mpifedmeta.run import protocol
    from mpifedmeta.run.config import ConfigError
    world = _mpi_world()
    assert protocol.agreed(world, lambda: world.rank) == world.rank
    assert protocol.agreed(world, lambda: "root", root_only=True) == ("root" if world.is_root else None)

    def full():
        raise files.DiskFull(errno.ENOSPC, "no space left on /dev/x (mounted on /x) while writing /x/metrics.h5")
    with pytest.raises(files.DiskFull, match="while writing /x/metrics.h5"):
        protocol.agreed(world, full, root_only=True, errors=())

    def bad_on_last():
        if world.rank == world.size - 1:
            raise ConfigError("train.nu = -1: must be >= 0")
    with pytest.raises(protocol.BadInput, match="train.nu"):
        protocol.agreed(world, bad_on_last)


@pytest.mark.mpi
def test_output_lock_held_refuses_on_every_rank():
    import tempfile
    from mpifedmeta.run import protocol
    world = _mpi_world()
    base = world.comm.bcast(tempfile.mkdtemp(prefix="mpifedmeta-lock-") if world.is_root else None, root=0)
    try:
        with protocol.output_lock(world, base):
            with pytest.raises(protocol.BadInput, match="in use by another mpifedmeta run"):
                with protocol.output_lock(world, base):       # a second open file description: refused
                    pass
        with protocol.output_lock(world, base):               # released: free again
            pass
    finally:
        world.comm.Barrier()
        if world.is_root:
            shutil.rmtree(base, ignore_errors=True)

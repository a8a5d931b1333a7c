"""Shared helpers for the CLI / MPI / resume tests: tiny configs, running the CLI as a subprocess
(optionally under mpiexec), and reading the HDF5 outputs (docs/hdf5-layout.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)          # the venv's bin/ (python, mpiexec, mpifedmeta)
TIMEOUT = 120                                   # seconds: no subprocess can hang CI
# Where the tests run: "cpu" (default, even on a GPU machine: CLI subprocesses get CUDA_VISIBLE_DEVICES="")
# or "cuda" (MPIFEDMETA_TEST_DEVICE=cuda: the suite on the GPU).
TEST_DEVICE = os.environ.get("MPIFEDMETA_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise SystemExit(f"MPIFEDMETA_TEST_DEVICE = {TEST_DEVICE!r}: must be cpu or cuda")


def mpiexec_command() -> list[str]:
    """The MPI launcher the tests use: $MPIEXEC if set (may carry flags, e.g. "mpiexec --oversubscribe"),
    else the venv's bin/mpiexec (mpich wheel), else the mpiexec on PATH (a system MPI)."""
    if os.environ.get("MPIEXEC"):
        return shlex.split(os.environ["MPIEXEC"])
    if os.path.exists(os.path.join(BIN, "mpiexec")):
        return [os.path.join(BIN, "mpiexec")]
    return [shutil.which("mpiexec") or "mpiexec"]

# A tiny run on the bundled digits data: a few seconds per process, mostly start-up.
TINY_TOML = """\
[data]
dataset = "digits"
num_agents = 12
holdout_agents = 2
partition = "shards"
classes_per_agent = 2
test_fraction = 0.25

[model]
name = "mlp"
hidden = [16]

[train]
rounds = 4
agents_per_round = 5
local_steps = 2
nu = 2
alpha = 0.05
beta = 0.05
batch_size = 8
metagrad = "exact"
seed = 0

[eval]
every = 2
finetune_steps = [0, 1, 2]

[output]
dir = "runs/never-used-by-tests"
checkpoint_every = 2
"""


def write_tiny_config(directory, text: str = TINY_TOML) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(str(directory), "tiny.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def sets(**values) -> list[str]:
    """``sets(train__rounds=6)`` → ["--set", "train.rounds=6"] (double underscore = the dot)."""
    out = []
    for k, v in values.items():
        sec, key = k.split("__", 1)
        if isinstance(v, str):
            v = json.dumps(v)
        elif isinstance(v, (list, tuple)):
            v = json.dumps(list(v))
        elif isinstance(v, bool):
            v = "true" if v else "false"
        out += ["--set", f"{sec}.{key}={v}"]
    return out


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MPIFEDMETA_INJECT_FAILURE", None)
    if TEST_DEVICE == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""       # auto = CPU, as on a machine without a GPU
    # pytest-mpi / a surrounding mpiexec must not leak into the child jobs
    for k in list(env):
        if k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_")):
            env.pop(k)
    if extra:
        env.update(extra)
    return env


def mpifedmeta_cmd(args: list[str], np_: int | None = None) -> list[str]:
    exe = os.path.join(BIN, "mpifedmeta")
    if np_ is None:
        return [exe] + list(args)
    return mpiexec_command() + ["-n", str(np_), exe] + list(args)


def run_cli(args: list[str], np_: int | None = None, timeout: float = TIMEOUT, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``mpifedmeta ARGS`` (under ``mpiexec -n np_`` when given); never hangs longer than ``timeout``."""
    t0 = time.perf_counter()
    proc = subprocess.run(mpifedmeta_cmd(args, np_), capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env), cwd=cwd or REPO)
    proc.elapsed = time.perf_counter() - t0
    return proc


def describe(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def assert_ok(proc) -> None:
    assert proc.returncode == 0, describe(proc)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_error_line(proc, code: int = 2, *must_contain: str) -> str:
    """Exit ``code`` and exactly one non-empty stderr line starting "mpifedmeta: error:"."""
    assert proc.returncode == code, describe(proc)
    lines = error_lines(proc)
    assert len(lines) == 1, describe(proc)
    assert lines[0].startswith("mpifedmeta: error:"), describe(proc)
    for text in must_contain:
        assert text in lines[0], describe(proc)
    return lines[0]


# --------------------------------------------------------------------------- outputs

def checkpoint_path(out: str, round_: int) -> str:
    return os.path.join(out, "checkpoints", f"round_{round_:06d}.h5")


def checkpoint_rounds(out: str) -> list[int]:
    d = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(d) if n.startswith("round_") and n.endswith(".h5"))
    return [int(n[6:12]) for n in names]


def read_model(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: v[()] for k, v in f["model"].items()}


def final_model(out: str) -> dict[str, np.ndarray]:
    return read_model(checkpoint_path(out, checkpoint_rounds(out)[-1]))


def read_metrics(out: str) -> dict[str, np.ndarray]:
    """Every dataset of metrics.h5 as ``group/name`` → array."""
    res = {}
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                res[name] = obj[()]
        f.visititems(visit)
    return res


def assert_models_identical(a: dict, b: dict, what: str = "") -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what} {k}: {a[k].dtype} vs {b[k].dtype}"
        assert a[k].shape == b[k].shape, f"{what} {k}"
        assert np.array_equal(a[k], b[k]), (f"{what} {k}: max |diff| "
                                            f"{np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))}")


def arrays_identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bits (NaN == NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def file_hashes(root: str) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path → hex)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def local_round_array(backend, block, w, spec, round_, cohort, weights):
    """algorithm.local_round as (one int64 array: the displacement sums then the meta-loss limbs,
    the 0-dim bad flag tensor), so that the sums of several blocks can be added and compared."""
    import numpy as np
    from mpifedmeta.federation import algorithm
    sums = algorithm.local_round(backend, block, w, spec, round_, cohort, weights)
    return np.concatenate([sums.displacements.cpu().numpy(), sums.loss.reshape(-1).cpu().numpy()]), sums.bad

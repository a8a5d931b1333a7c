"""MPI behaviour.

Serial tests (unmarked) launch ``mpiexec -n P`` subprocesses: bit-identical results for P = 1, 2, 3,
fault injection aborts the whole job (no hang), config errors print once.

``@pytest.mark.mpi`` tests run in-process on whatever COMM_WORLD pytest was started with
(tests/run.sh: 2 and 3 ranks; they also pass on 1). Every rank calls the same collectives, and
results are agreed on with allgather before asserting, so a failure on one rank never deadlocks.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

from helpers import (local_round_array, assert_models_identical, assert_one_error_line, arrays_identical, checkpoint_path,
                     checkpoint_rounds, cli_env, describe, final_model, mpifedmeta_cmd, read_metrics,
                     read_model, run_cli, sets, write_tiny_config, TEST_DEVICE)

ROUNDS = 3

VARIANTS = {
    "float32": sets(train__dtype="float32"),
    "float64-samples-dirichlet": sets(train__dtype="float64", train__weighting="samples",
                                      data__partition="dirichlet", data__dirichlet_alpha=0.3),
    "float32-fullbatch-dirichlet": sets(train__batch_size="full", data__partition="dirichlet",
                                        data__dirichlet_alpha=0.3),
}
COMPARED = ("train/round", "train/train_loss", "train/num_sampled", "eval/round", "eval/train_agent_acc",
            "eval/holdout_agent_acc", "eval/train_acc_mean", "eval/holdout_acc_mean",
            "eval/train_agent_loss", "eval/holdout_agent_loss", "eval/train_loss_mean", "eval/holdout_loss_mean",
            "partition/train_ptr", "partition/train_idx", "partition/test_ptr", "partition/test_idx")
# Padded (full-batch) computations pad every agent to the largest split of ANY agent, so even with
# unequal sample counts nothing depends on which agents share a rank: no exceptions.
KNOWN_P_DEPENDENT: dict = {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_results_bit_identical_for_1_2_3_ranks(variant, tmp_path):
    cfg = write_tiny_config(tmp_path)
    dtype = np.float64 if "float64" in variant else np.float32
    runs = {}
    for P in (1, 2, 3):
        out = str(tmp_path / f"P{P}")
        proc = run_cli(["run", cfg] + sets(train__rounds=ROUNDS, output__dir=out) + VARIANTS[variant], np_=P)
        assert proc.returncode == 0, f"P={P}: {describe(proc)}"
        assert f"on {P} rank(s)" in proc.stdout
        runs[P] = (final_model(out), read_metrics(out), checkpoint_rounds(out), read_model(checkpoint_path(out, 0)))
    model1, metrics1, ckpts1, init1 = runs[1]
    assert ckpts1[-1] == ROUNDS
    assert all(v.dtype == dtype for v in model1.values())
    assert metrics1["eval/round"].tolist() == [0, 2, 3]
    assert np.all(np.isfinite(metrics1["train/train_loss"]))
    assert any(not np.array_equal(init1[k], model1[k]) for k in model1)
    compared = [n for n in COMPARED if n not in KNOWN_P_DEPENDENT.get(variant, ())]
    for P in (2, 3):
        model, metrics, ckpts, init = runs[P]
        assert ckpts == ckpts1
        assert_models_identical(init1, init, f"initial model P=1 vs P={P}")
        assert_models_identical(model1, model, f"final model P=1 vs P={P}")
        for name in compared:
            assert arrays_identical(metrics1[name], metrics[name]), f"{name} differs for P=1 vs P={P} ({variant})"
    print(f"\n[{variant}] P=1/2/3: final checkpoints and {len(compared)} metrics datasets bit-identical")


# --------------------------------------------------------------------------- block composition (the mechanism)
# Each rank runs local_round / evaluate_block on its contiguous block and the limbs are summed. So
# P-invariance means: splitting the agents into blocks in any way gives the same summed limbs and the
# same per-agent evaluation rows. Checked in-process on one rank (COMM_SELF), cheap and exact.

_BLOCK_SETUPS = {}


def _block_setup(batch_size, dtype):
    key = (batch_size, dtype)
    if key not in _BLOCK_SETUPS:
        from mpi4py import MPI
        from mpifedmeta.run import config, session
        from mpifedmeta.data import load_dataset
        cfg = config.load(None, ["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=3",
                                 "train.local_steps=2", "train.nu=2", "train.alpha=0.05", "train.beta=0.05",
                                 "model.hidden=[16]", "data.partition=\"dirichlet\"", f"train.batch_size={batch_size}",
                                 f"train.dtype=\"{dtype}\"", "output.dir=\"/nonexistent/never-written\"",
                                 f"train.device=\"{TEST_DEVICE}\""])
        threads = torch.get_num_threads()
        s = session.setup(cfg, _world(MPI.COMM_SELF))
        torch.set_num_threads(threads)
        _BLOCK_SETUPS[key] = (s, load_dataset("digits", ""), s.w0)
    return _BLOCK_SETUPS[key]


def _block(s, ds, lo, hi):
    from mpifedmeta.federation.block import build_block
    return build_block(ds.x, ds.y, s.population.partition, lo, hi, s.device, s.dtype)


SPLITS = [[(0, 12)], [(0, 6), (6, 12)], [(0, 4), (4, 8), (8, 12)], [(0, 1), (1, 7), (7, 12)]]
COHORT = np.array([0, 6, 7], dtype=np.int64)   # agent 0 has the most samples: padding differs per block


def _summed_limbs(s, ds, params, split):
    from mpifedmeta.federation import algorithm
    w = algorithm.cohort_weights(COHORT, s.population.train_counts, "samples")
    total = None
    for lo, hi in split:
        limbs, bad = local_round_array(s.round.backend, _block(s, ds, lo, hi), params, s.round.spec, 1, COHORT, w)
        assert bad == 0
        total = limbs if total is None else total + limbs
    return total


def _eval_rows(s, ds, params, split):
    from mpifedmeta.federation import algorithm
    ids = np.array([0, 3, 6, 10, 11], dtype=np.int64)
    return np.concatenate([algorithm.evaluate_block(s.round.backend, _block(s, ds, lo, hi), params, ids,
                                                    [0, 1, 2], 0.05, 256) for lo, hi in split])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_does_not_depend_on_block_composition(dtype):
    s, ds, params = _block_setup(8, dtype)
    ref = _summed_limbs(s, ds, params, SPLITS[0])
    for split in SPLITS[1:]:
        assert np.array_equal(ref, _summed_limbs(s, ds, params, split)), split


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_full_batch_round_does_not_depend_on_block_composition(dtype):
    s, ds, params = _block_setup("\"full\"", dtype)
    ref = _summed_limbs(s, ds, params, SPLITS[0])
    for split in SPLITS[1:]:
        assert np.array_equal(ref, _summed_limbs(s, ds, params, split)), split


def test_evaluation_accuracy_does_not_depend_on_block_composition():
    s, ds, params = _block_setup(8, "float32")
    ref = _eval_rows(s, ds, params, SPLITS[0])
    K = 3
    for split in SPLITS[1:]:
        rows = _eval_rows(s, ds, params, split)
        assert np.array_equal(ref[:, 0], rows[:, 0])
        assert np.array_equal(ref[:, 1 + K:], rows[:, 1 + K:]), split      # accuracies


def test_evaluation_does_not_depend_on_block_composition():
    s, ds, params = _block_setup(8, "float32")
    ref = _eval_rows(s, ds, params, SPLITS[0])
    for split in SPLITS[1:]:
        assert np.array_equal(ref, _eval_rows(s, ds, params, split)), split


# --------------------------------------------------------------------------- (b) failures end the whole job

def _run_streaming(cmd, env, timeout):
    """Run ``cmd``; return (code, stdout, stderr, seconds to exit, seconds from the first stderr line
    containing 'injected failure' to exit or None)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err_lines, marks = [], {}

    def read_err():
        for line in proc.stderr:
            if "injected failure" in line and "first" not in marks:
                marks["first"] = time.perf_counter()
            err_lines.append(line)

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    try:
        out = proc.stdout.read()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"no exit after {timeout} s: the job hangs\n{''.join(err_lines)[-3000:]}")
    end = time.perf_counter()
    reader.join(10)
    latency = end - marks["first"] if "first" in marks else None
    return proc.returncode, out, "".join(err_lines), end - t0, latency


@pytest.mark.parametrize("spec, nprocs", [("1:2", 2), ("0:2", 2), ("2:1", 3)])
def test_injected_failure_aborts_the_whole_job(spec, nprocs, tmp_path):
    cfg = write_tiny_config(tmp_path)
    out = str(tmp_path / "out")
    cmd = mpifedmeta_cmd(["run", cfg] + sets(train__rounds=4, output__dir=out), nprocs)
    code, stdout, stderr, total, latency = _run_streaming(
        cmd, cli_env({"MPIFEDMETA_INJECT_FAILURE": spec}), timeout=120)
    rank, round_ = spec.split(":")
    print(f"\nMPIFEDMETA_INJECT_FAILURE={spec} mpiexec -n {nprocs}: exit {code} after {total:.1f} s in total, "
          f"{latency if latency is None else round(latency, 2)} s after the injected error was printed")
    assert code != 0, stderr
    assert code not in (2, 3, 4), f"a crash must not look like bad input / a stop / divergence: {code}"
    assert f"injected failure on rank {rank} in round {round_}" in stderr
    assert f"[rank {rank}] Traceback" in stderr                  # the failing rank is named
    # The one-line summary "mpifedmeta: error on rank N: ..." is written right before MPI_Abort; hydra
    # sometimes drops that last line when it kills the job (seen with -n 3), so it is not required here.
    assert latency is not None and latency < 30, f"abort took {latency} s"
    assert total < 60, f"whole job took {total:.1f} s"
    # round 1 completed before the failure (round 2); for failures in round 1 only round 0 exists
    if os.path.isdir(os.path.join(out, "checkpoints")):
        assert max(checkpoint_rounds(out)) < int(round_)


def test_config_error_under_mpiexec_3_prints_once(tmp_path):
    cfg = write_tiny_config(tmp_path)
    proc = run_cli(["run", cfg] + sets(train__alpha=-1.0, output__dir=str(tmp_path / "out")), np_=3)
    assert_one_error_line(proc, 2, "train.alpha")
    assert proc.stderr.count("train.alpha") == 1
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- (c) in-process, any number of ranks

def _comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _world(comm=None):
    from mpi4py import MPI
    from mpifedmeta.parallel.dist import World
    comm = comm or MPI.COMM_WORLD
    return World(comm, comm.Get_rank(), comm.Get_size(), local_rank=comm.Get_rank(), local_size=comm.Get_size())


def _agree(comm, ok: bool, message: str = "") -> None:
    """Assert on every rank that every rank succeeded (no rank is left waiting)."""
    results = comm.allgather((ok, message))
    bad = [f"rank {r}: {m}" for r, (o, m) in enumerate(results) if not o]
    assert not bad, "; ".join(bad)


@pytest.mark.mpi
@pytest.mark.parametrize("N", [0, 1, 2, 3, 5, 7, 12, 13, 100])
def test_block_range_covers_every_agent_once(N):
    from mpifedmeta.parallel import dist
    comm = _comm()
    size, rank = comm.Get_size(), comm.Get_rank()
    ranges = comm.allgather(dist.block_range(N, size, rank))
    owned = np.concatenate([np.arange(lo, hi) for lo, hi in ranges]) if ranges else np.array([])
    assert owned.tolist() == list(range(N))                      # exactly once, in rank order
    sizes = [hi - lo for lo, hi in ranges]
    assert all(s >= 0 for s in sizes) and max(sizes) - min(sizes) <= 1
    assert ranges[0][0] == 0 and ranges[-1][1] == N
    # also for communicator sizes larger than N (some ranks own nothing), computed for every rank
    for P in (1, 2, 3, 4, 7, N + 1, N + 5):
        if P < 1:
            continue
        rs = [dist.block_range(N, P, r) for r in range(P)]
        assert sum(hi - lo for lo, hi in rs) == N
        assert all(rs[i][1] == rs[i + 1][0] for i in range(P - 1))


@pytest.mark.mpi
@pytest.mark.parametrize("dtype, row_shape", [(np.float64, (3,)), (np.int64, ()), (np.float32, (2, 2))])
def test_gather_rows_concatenates_in_rank_order(dtype, row_shape):
    from mpifedmeta.parallel import dist
    comm = _comm()
    world = _world(comm)
    rank, size = world.rank, world.size
    counts = [(2 * r) % 3 for r in range(size)]                    # rank 0 has zero rows; others 2, 1, ...
    width = int(np.prod(row_shape)) if row_shape else 1

    def rows_of(r):
        n = counts[r]
        vals = 1000 * r + np.arange(n * width)
        return vals.reshape((n,) + row_shape).astype(dtype)

    got = dist.gather_rows(world, rows_of(rank))
    if rank == 0:
        want = np.concatenate([rows_of(r) for r in range(size)])
        ok = got is not None and got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        msg = "" if ok else f"got {got!r}, want {want!r}"
    else:
        ok, msg = got is None, f"non-root got {got!r}"
    _agree(comm, ok, msg)


@pytest.mark.mpi
def test_gather_rows_all_empty():
    from mpifedmeta.parallel import dist
    comm = _comm()
    world = _world(comm)
    got = dist.gather_rows(world, np.zeros((0, 5)))
    _agree(comm, (got.shape == (0, 5)) if world.is_root else got is None, repr(got))


@pytest.mark.mpi
@pytest.mark.parametrize("seed", [0, 1])
def test_allreduce_of_exactsum_limbs_equals_serial_sum(seed):
    from mpifedmeta.core import exactsum
    from mpifedmeta.parallel import dist
    comm = _comm()
    world = _world(comm)
    g = np.random.default_rng(seed)                               # same terms on every rank
    n_terms, n = 37, 64
    mags = 10.0 ** g.uniform(-12, 4, size=(n_terms, n))
    terms = torch.as_tensor(mags * g.choice([-1.0, 1.0], size=(n_terms, n)))
    lo, hi = dist.block_range(n_terms, world.size, world.rank)
    local = exactsum.encode_sum(terms[lo:hi]).numpy().copy()
    assert local.dtype == np.int64 and local.shape == (2, n)
    total = dist.allreduce_sum(world, local)
    serial = exactsum.encode_sum(terms).numpy()
    ok = np.array_equal(total, serial) and arrays_identical(exactsum.decode(total), exactsum.decode(serial))
    _agree(comm, ok, "limbs differ from the serial sum")
    # and the decoded bits agree between ranks
    bits = comm.allgather(exactsum.decode(total).tobytes())
    assert all(b == bits[0] for b in bits)


@pytest.mark.mpi
def test_allreduce_flags_are_summed():
    from mpifedmeta.parallel import dist
    comm = _comm()
    world = _world(comm)
    buf = np.array([world.rank, 1, 0], dtype=np.int64)
    dist.allreduce_sum(world, buf)
    size = world.size
    assert buf.tolist() == [size * (size - 1) // 2, size, 0]


@pytest.mark.mpi
def test_first_error_agrees_on_every_rank():
    from mpifedmeta.parallel import dist
    comm = _comm()
    world = _world(comm)
    assert dist.first_error(world, None) is None
    last = world.size - 1
    msg = dist.first_error(world, "boom" if world.rank == last else None)
    assert msg is not None and "boom" in msg
    if last > 0:
        assert f"[rank {last}]" in msg
    assert dist.first_error(world, f"r{world.rank}") == "r0"       # the lowest rank wins


@contextlib.contextmanager
def _shared_tmpdir(comm):
    """A temporary directory every rank sees (made and removed by rank 0, after a barrier)."""
    d = comm.bcast(tempfile.mkdtemp(prefix="mpifedmeta-mpi-") if comm.Get_rank() == 0 else None, root=0)
    try:
        yield d
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(d, ignore_errors=True)


def _on_root(comm, check) -> None:
    """Run the assertions of ``check()`` on rank 0 only and fail on every rank if they fail there
    (never a rank left waiting: the error travels by broadcast)."""
    err = None
    if comm.Get_rank() == 0:
        try:
            check()
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
    err = comm.bcast(err, root=0)
    assert err is None, err


def _tiny_cfg(out_dir, *extra):
    from mpifedmeta.run import config
    return config.load(None, ["data.num_agents=12", "data.holdout_agents=2", "train.agents_per_round=5",
                              "train.local_steps=2", "train.nu=2", "train.alpha=0.05", "train.beta=0.05",
                              "train.batch_size=8", "train.rounds=3", "eval.every=2", "eval.finetune_steps=[0, 1]",
                              "model.hidden=[16]", "output.checkpoint_every=2",
                              f'output.dir="{out_dir}"', f'train.device="{TEST_DEVICE}"', *extra])


@pytest.mark.mpi
@pytest.mark.parametrize("extra", [[], ["train.agents_per_round=1"],
                                   ["train.dtype=\"float64\"", "train.weighting=\"samples\"",
                                    "data.partition=\"dirichlet\"", "train.agents_per_round=2"],
                                   ["train.agent_chunk=2", "eval.stationarity=true"]],
                         ids=["cohort5", "cohort1", "float64-samples-dirichlet", "agent-chunk-2"])
def test_inprocess_run_on_world_equals_run_on_self(extra):
    """A run on COMM_WORLD (all ranks) is bit-identical to a run on COMM_SELF by rank 0 alone; with
    agents_per_round=1, every round has ranks that own no sampled agent."""
    from mpi4py import MPI
    from mpifedmeta.run import start
    comm = _comm()
    world = _world(comm)
    with _shared_tmpdir(comm) as base:
        code = start.start_new(_tiny_cfg(os.path.join(base, "world"), *extra), world)
        _agree(comm, code == 0, f"exit code {code} on COMM_WORLD")

        def check():
            self_code = start.start_new(_tiny_cfg(os.path.join(base, "self"), *extra), _world(MPI.COMM_SELF))
            assert self_code == 0, f"exit code {self_code} on COMM_SELF"
            a, b = final_model(os.path.join(base, "world")), final_model(os.path.join(base, "self"))
            assert_models_identical(a, b, "COMM_WORLD vs COMM_SELF")
            ma, mb = read_metrics(os.path.join(base, "world")), read_metrics(os.path.join(base, "self"))
            assert ma["train/round"].tolist() == [1, 2, 3]
            if "train.agents_per_round=1" in extra:
                assert ma["train/num_sampled"].tolist() == [1, 1, 1]
            for name in ("train/train_loss", "eval/round", "eval/train_agent_acc", "eval/holdout_agent_acc",
                         "eval/train_agent_loss", "eval/grad_norm_sq"):
                assert arrays_identical(ma[name], mb[name]), name
            assert checkpoint_rounds(os.path.join(base, "world")) == [0, 2, 3]
        _on_root(comm, check)


@pytest.mark.mpi
def test_inprocess_resume_on_world_equals_uninterrupted():
    """3 rounds, then resume to 5 rounds on COMM_WORLD == 5 rounds straight (same ranks)."""
    from mpifedmeta.run import start
    comm = _comm()
    world = _world(comm)
    with _shared_tmpdir(comm) as base:
        a, b = os.path.join(base, "a"), os.path.join(base, "b")
        codes = [start.start_new(_tiny_cfg(a), world),
                 start.resume(a, world, 5),
                 start.start_new(_tiny_cfg(b, "train.rounds=5"), world)]
        _agree(comm, codes == [0, 0, 0], f"exit codes {codes}")

        def check():
            assert_models_identical(final_model(a), final_model(b), "resumed vs straight")
            ma, mb = read_metrics(a), read_metrics(b)
            assert ma["train/round"].tolist() == [1, 2, 3, 4, 5]
            assert arrays_identical(ma["train/train_loss"], mb["train/train_loss"])
        _on_root(comm, check)

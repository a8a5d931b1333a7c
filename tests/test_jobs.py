"""The SLURM job scripts in jobs/ without SLURM: syntax, the sweep grid, the launch command, and the
signal-forward / requeue state machine against fake srun, mpiexec, scontrol and mpifedmeta.
(.ci/slurm.sh runs them on a real one-node SLURM cluster.)"""

import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(REPO, "jobs")
SCRIPTS = ["single-node.sbatch", "multi-node.sbatch", "nu-sweep.sbatch"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("path", [os.path.join("jobs", s) for s in SCRIPTS + ["common.sh"]]
                         + [".ci/slurm.sh", ".ci/slurm-cluster.sh", ".ci/multinode.sh", ".ci/slurm-two-nodes.sh", ".ci/run"])
def test_bash_syntax(path):
    full = os.path.join(REPO, path)
    assert os.path.exists(full), path
    r = subprocess.run(["bash", "-n", full], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_header_asks_for_signal_and_requeue(name):
    text = open(os.path.join(JOBS, name)).read()
    for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert directive in text, (name, directive)
    # every knob is documented in the header
    for knob in ("partition", "account", "GPUs", "MPIFEDMETA_VENV", "MPIFEDMETA_MODULES", "MPIFEDMETA_LAUNCH"):
        assert knob in text, (name, knob)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


FAKE_MPIFEDMETA = r"""#!/bin/bash
# fake `mpifedmeta run ...`: behaviour from FAKE_MODE; records its arguments and signals
echo "ARGS $*" >>"$FAKE_DIR/mpifedmeta.log"
echo "NETMOD ${MPIR_CVAR_CH4_NETMOD:-unset}" >>"$FAKE_DIR/mpifedmeta.log"
[ "$1" = info ] && exit 0
case $FAKE_MODE in
  ok) exit 0 ;;
  fail) exit 1 ;;
  exit3) exit 3 ;;
esac
need=1; [ "$FAKE_MODE" = swallow-first ] && need=2
n=0; stop=0
trap 'n=$((n+1)); echo "GOT USR1" >>"$FAKE_DIR/mpifedmeta.log"; [ $n -ge $need ] && stop=1' USR1
trap 'echo "GOT TERM" >>"$FAKE_DIR/mpifedmeta.log"; stop=1' TERM
touch "$FAKE_DIR/ready"
for ((i = 0; i < 300; i++)); do
  [ $stop = 1 ] && { echo "mpifedmeta: stop requested; checkpoint written"; exit 3; }
  sleep 0.05
done
exit 9
"""


@pytest.fixture
def fake(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write(bindir / "mpifedmeta", FAKE_MPIFEDMETA)
    _write(bindir / "srun", '#!/bin/bash\necho "SRUN $*" >>"$FAKE_DIR/launch.log"\n'
                            'while [[ ${1:-} == -* ]]; do shift; done\nexec "$@"\n')
    _write(bindir / "mpiexec", '#!/bin/bash\necho "MPIEXEC $*" >>"$FAKE_DIR/launch.log"\n'
                               'while [[ ${1:-} == -* ]]; do [ "$1" = -n ] && shift; shift; done\nexec "$@"\n')
    _write(bindir / "scontrol", '#!/bin/bash\necho "$*" >>"$FAKE_DIR/scontrol.log"\n'
                                '[ "$1" = requeue ] && exit "${FAKE_REQUEUE_RC:-0}"\nexit 0\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "MPIFEDMETA_", "VIRTUAL_ENV", "MPIR_CVAR_"))}
    env.update(PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", FAKE_DIR=str(tmp_path),
               SLURM_JOB_ID="123", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(tmp_path),
               MPIFEDMETA_SIGNAL_GRACE="0", MPIFEDMETA_SIGNAL_RESEND="1", FAKE_MODE="stoppable")
    return tmp_path, env


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


def _run(tmp, env, script="single-node.sbatch", send=None, args=("cfg.toml",), timeout=30, **extra):
    env = dict(env, **extra)
    p = subprocess.Popen(["bash", os.path.join(JOBS, script), *args], cwd=tmp, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send is not None:
        t0 = time.time()
        while not (tmp / "ready").exists():
            assert p.poll() is None, p.communicate()[0]
            assert time.time() - t0 < timeout, "the fake step never started"
            time.sleep(0.02)
        p.send_signal(send)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out, _read(tmp / "scontrol.log"), _read(tmp / "mpifedmeta.log")


def test_done_is_not_requeued(fake):
    tmp, env = fake
    rc, out, sc, mf = _run(tmp, env, FAKE_MODE="ok")
    assert rc == 0, out
    assert "requeue" not in sc
    assert "finished: all rounds done" in out
    assert "ARGS run cfg.toml --auto-resume" in mf
    assert "SRUN --mpi=pmi2" in _read(tmp / "launch.log")


def test_error_is_not_requeued(fake):
    tmp, env = fake
    rc, out, sc, _ = _run(tmp, env, FAKE_MODE="fail")
    assert rc == 1, out
    assert "requeue" not in sc


def test_usr1_is_forwarded_then_requeued(fake):
    tmp, env = fake
    rc, out, sc, mf = _run(tmp, env, send=signal.SIGUSR1)
    assert rc == 0, out
    assert "GOT USR1" in mf
    assert "requeue 123" in sc, (sc, out)
    assert "requeued: the next run resumes" in out


def test_usr1_lost_during_startup_is_sent_again(fake):
    tmp, env = fake
    rc, out, sc, mf = _run(tmp, env, send=signal.SIGUSR1, FAKE_MODE="swallow-first")
    assert rc == 0, out
    assert mf.count("GOT USR1") >= 2, mf
    assert "requeue 123" in sc


def test_usr1_waits_for_the_grace_period(fake):
    tmp, env = fake
    t0 = time.time()
    rc, out, sc, mf = _run(tmp, env, send=signal.SIGUSR1, MPIFEDMETA_SIGNAL_GRACE="2")
    assert rc == 0, out
    assert "forwarding SIGUSR1 in" in out
    assert time.time() - t0 >= 1.5
    assert "requeue 123" in sc


def test_term_checkpoints_but_never_requeues(fake):
    tmp, env = fake
    rc, out, sc, mf = _run(tmp, env, send=signal.SIGTERM)
    assert rc == 3, out
    assert "GOT TERM" in mf
    assert "requeue" not in sc


def test_exit3_without_batch_signal_is_requeued(fake):
    # e.g. --signal=USR1@LEAD without B: signals the ranks directly
    tmp, env = fake
    rc, out, sc, _ = _run(tmp, env, FAKE_MODE="exit3")
    assert rc == 0, out
    assert "requeue 123" in sc


@pytest.mark.parametrize("extra", [{"MPIFEDMETA_REQUEUE": "0"},
                                   {"SLURM_RESTART_COUNT": "5", "MPIFEDMETA_MAX_RESTARTS": "5"},
                                   {"FAKE_REQUEUE_RC": "1"}])
def test_no_requeue_when_disabled_exhausted_or_refused(fake, extra):
    tmp, env = fake
    rc, out, sc, _ = _run(tmp, env, FAKE_MODE="exit3", **extra)
    assert rc == 3, out
    if "FAKE_REQUEUE_RC" not in extra:
        assert "requeue" not in sc


def test_mpiexec_launch_and_gpu_device(fake):
    tmp, env = fake
    rc, out, _, mf = _run(tmp, env, FAKE_MODE="ok", MPIFEDMETA_LAUNCH="mpiexec", SLURM_GPUS_PER_TASK="1",
                          MPIFEDMETA_OUT="outdir")
    assert rc == 0, out
    assert "MPIEXEC -n 2" in _read(tmp / "launch.log")
    assert "--set train.device=cuda" in mf
    assert "--set output.dir=outdir" in mf


def test_bad_launcher_and_missing_config(fake):
    tmp, env = fake
    rc, out, _, _ = _run(tmp, env, MPIFEDMETA_LAUNCH="aprun")
    assert rc == 2 and "MPIFEDMETA_LAUNCH" in out
    rc, out, _, _ = _run(tmp, env, args=())
    assert rc == 2 and "usage" in out


def test_sweep_grid_and_task_mapping(fake):
    tmp, env = fake
    rc, out, _, _ = _run(tmp, env, script="nu-sweep.sbatch", MPIFEDMETA_DRY_RUN="1", MPIFEDMETA_NUS="0 1 2",
                         MPIFEDMETA_METAGRADS="exact fo", MPIFEDMETA_SEEDS="7")
    assert rc == 0, out
    assert "grid of 6 point(s): submit with --array=0-5" in out
    assert "task 3: nu=1 metagrad=fo seed=7 -> runs/nu-sweep/nu1-fo-seed7" in out
    rc, out, _, mf = _run(tmp, env, script="nu-sweep.sbatch", FAKE_MODE="ok", SLURM_ARRAY_TASK_ID="4",
                          SLURM_ARRAY_JOB_ID="120", MPIFEDMETA_NUS="0 1 2", MPIFEDMETA_METAGRADS="exact fo",
                          MPIFEDMETA_OUT="sw", args=("cfg.toml", "--set", "train.rounds=3"))
    assert rc == 0, out
    assert "ARGS run cfg.toml --auto-resume --set train.rounds=3 --set train.nu=2 --set output.dir=sw/nu2-exact " \
           "--set train.metagrad=exact" in mf, mf
    rc, out, _, _ = _run(tmp, env, script="nu-sweep.sbatch", SLURM_ARRAY_TASK_ID="3", MPIFEDMETA_NUS="0 1 2")
    assert rc == 2 and "outside the grid of 3" in out


def _fake_mpichversion(tmp, device):
    _write(tmp / "bin" / "mpichversion", f'#!/bin/bash\necho "MPICH Version:      5.0.2"\necho "MPICH Device:       {device}"\n')


@pytest.mark.parametrize("nodes, device, launch, preset, want", [
    ("2", "ch4:ucx ofi", "srun", None, "ofi"),         # the PyPI mpich wheel across nodes: ofi
    ("1", "ch4:ucx ofi", "srun", None, "unset"),       # one node: unchanged (no address goes through PMI)
    ("2", "ch4:ucx ofi", "srun", "ucx", "ucx"),        # the user's choice wins
    ("2", "ch4:ucx ofi", "mpiexec", None, "unset"),    # hydra has its own PMI server
    ("2", "ch4:ofi", "srun", None, "unset"),           # an MPICH without UCX: nothing to avoid
])
def test_multinode_srun_netmod(fake, nodes, device, launch, preset, want):
    tmp, env = fake
    _fake_mpichversion(tmp, device)
    extra = {"FAKE_MODE": "ok", "SLURM_JOB_NUM_NODES": nodes, "MPIFEDMETA_LAUNCH": launch}
    if preset:
        extra["MPIR_CVAR_CH4_NETMOD"] = preset
    rc, out, _, mf = _run(tmp, env, script="multi-node.sbatch", **extra)
    assert rc == 0, out
    assert f"NETMOD {want}" in mf, (mf, out)
    assert ("MPIR_CVAR_CH4_NETMOD=ofi" in out) == (want == "ofi" and not preset), out


def test_info_before_the_run(fake):
    tmp, env = fake
    rc, out, _, mf = _run(tmp, env, script="multi-node.sbatch", FAKE_MODE="ok", MPIFEDMETA_INFO="1")
    assert rc == 0, out
    assert mf.index("ARGS info") < mf.index("ARGS run cfg.toml --auto-resume"), mf
    launches = _read(tmp / "launch.log").splitlines()
    assert len(launches) == 2 and all(l.startswith("SRUN --mpi=pmi2") for l in launches), launches
    rc, out, _, mf = _run(tmp, env, script="multi-node.sbatch", FAKE_MODE="ok")   # without the knob: no info
    assert rc == 0 and mf.count("ARGS info") == 1 and mf.count("ARGS run") == 2, mf

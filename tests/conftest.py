import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import TEST_DEVICE  # noqa: E402  (MPIFEDMETA_TEST_DEVICE: cpu by default, or cuda)

# In-process tests run with the engine's default of one torch thread (as tests/run.sh sets it), so that a
# bare `pytest` checks the same thing: with more threads the parallel kernels split work by size, and the
# bit-identity tests (an agent's bits in any block size) do not hold. OMP_NUM_THREADS, if set, wins.
if not os.environ.get("OMP_NUM_THREADS"):
    import torch  # noqa: E402
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, request):
    """A module's own directory with the tiny config of helpers.write_tiny_config in it."""
    from helpers import write_tiny_config
    d = tmp_path_factory.mktemp(request.module.__name__.replace("test_", ""))
    write_tiny_config(d)
    return d


@pytest.fixture(scope="module")
def cfg_path(base_dir):
    """The tiny config's path (tiny.toml in base_dir)."""
    return str(base_dir / "tiny.toml")


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture
def cli_env():
    """Environment for subprocesses that run the CLI (single-threaded torch, unbuffered output)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("MPIFEDMETA_INJECT_FAILURE", None)
    if TEST_DEVICE == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.fixture
def python_exe():
    return sys.executable


@pytest.fixture
def device():
    """The device in-process tests put their blocks on: MPIFEDMETA_TEST_DEVICE (default cpu).

    The suite passes unchanged on a GPU machine: by default everything (CLI subprocesses included,
    through CUDA_VISIBLE_DEVICES="") runs on the CPU; MPIFEDMETA_TEST_DEVICE=cuda runs it on the GPU."""
    import torch
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("MPIFEDMETA_TEST_DEVICE=cuda but torch sees no GPU")
    return torch.device(TEST_DEVICE)


@pytest.fixture
def gpu():
    """The device of @pytest.mark.cuda tests: the GPU; skipped without one, unless
    MPIFEDMETA_CUDA_TESTS_ON_CPU=1 (a dry run of the tests' logic on the CPU)."""
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("MPIFEDMETA_CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """pytest-mpi prints a ~17-line "MPI Information" section at the end of every MPI run; the test
    command shows it only when asked (MPIFEDMETA_MPI_INFO=1): `mpifedmeta info` says the same."""
    if os.environ.get("MPIFEDMETA_MPI_INFO") == "1":
        return
    for plugin in list(config.pluginmanager.get_plugins()):
        if type(plugin).__name__ == "MPIPlugin":
            quiet = type("QuietMPIPlugin", (type(plugin),), {"pytest_terminal_summary": None})()
            config.pluginmanager.unregister(plugin)
            config.pluginmanager.register(quiet)

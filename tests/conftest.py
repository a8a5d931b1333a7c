import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    return env


@pytest.fixture
def python_exe():
    return sys.executable

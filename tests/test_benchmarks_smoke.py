"""Smoke test of the benchmark scripts: each runs its --quick setting and writes valid JSON.

Tiny settings only (the real runs are documented in benchmarks/README.md); the numbers are not
checked, only that every script runs end to end and records what it measured and where.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def _run(script, tmp_path, *extra, timeout=120):
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MPIFEDMETA_INJECT_FAILURE", None)
    r = subprocess.run([sys.executable, os.path.join(BENCH, f"{script}.py"), "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == script
    m = data["machine"]
    for key in ("torch_version", "device", "cpu_count", "torch_threads", "date_utc"):
        assert key in m, key
    assert data["rows"], "no measurements"
    return data


def test_throughput_quick(tmp_path):
    d = _run("throughput", tmp_path, "--threads", "1")
    assert all(r["ok"] for r in d["agreement"])
    row = d["rows"][0]
    assert row["baseline_aps"] > 0 and row["vmap_aps"] > 0
    assert d["end_to_end"]["rel_err_models"] < 1e-4


def test_memory_quick(tmp_path):
    d = _run("memory", tmp_path, "--threads", "1")
    assert all(r.get("peak_mb", -1) >= 0 for r in d["rows"])
    assert os.path.exists(tmp_path / "memory.png")


def test_flops_quick(tmp_path):
    d = _run("flops", tmp_path, "--threads", "1")
    assert d["peak_reference"]["gflops_median"] > 0
    assert all(r["flops"] > 0 and r["gflops"] > 0 for r in d["rows"])


@pytest.mark.skipif(shutil.which("mpiexec") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                    reason="no mpiexec")
def test_scaling_quick(tmp_path):
    d = _run("scaling", tmp_path, "--no-probe", "--ranks", "2", timeout=180)
    row = d["rows"][0]
    assert row["P"] == 2 and row["round_time_median_s"] > 0 and row["bytes_allreduced"] > 0


def test_hvp_variants_quick(tmp_path):
    d = _run("hvp_variants", tmp_path, "--threads", "1")
    assert d["rows"][0]["rel_err_vs_engine"]["vmap_rr"] < 1e-4


@pytest.mark.skipif(shutil.which("mpiexec") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                    reason="no mpiexec")
def test_peers_quick(tmp_path):
    """Every column runs (pfl only where it is installed, else the JSON says why) and the start-up check."""
    d = _run("peers", tmp_path, "--startup-runs", "1", timeout=420)
    rows = {r["system"]: r for r in d["rows"]}
    for system in ("mpifedmeta-2x1", "mpifedmeta-1xT", "loop-1xT"):
        r = rows[system]
        assert "error" not in r, r.get("error")
        assert r["s_per_round"] > 0 and r["startup_s"] > 0 and r["peak_rss_mib"] > 0
        assert len(r["round_times_s"]) == d["settings"]["rounds"]
    assert rows["mpifedmeta-2x1"]["processes"] == 2
    if "pfl-2x1" in rows:
        assert "error" not in rows["pfl-2x1"], rows["pfl-2x1"].get("error")
        assert rows["pfl-2x1"]["s_per_round"] > 0 and len(rows["pfl-2x1"]["worker_peak_rss_mib"]) == 2
    else:
        assert "pfl" in d["notes"]["pfl-2x1"]
    assert len(d["machine"]["loadavg_start"]) == 3
    assert d["startup"]["to_round1_start_s"] > 0


@pytest.mark.skipif(shutil.which("mpiexec") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")),
                    reason="no mpiexec")
def test_population_quick(tmp_path):
    d = _run("population", tmp_path, timeout=300)
    assert all(r["ok"] for r in d["rows"]) and {r["N"] for r in d["rows"]} == {1000, 100000}
    assert all(r["round_median_s"] > 0 and r["peak_rss_mb"] > 0 and r["startup_s"] >= 0 for r in d["rows"])
    assert os.path.exists(tmp_path / "population.png")

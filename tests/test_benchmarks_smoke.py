"""Smoke test of the benchmark scripts: each runs its --quick setting and writes valid JSON.

Tiny settings only (the real runs are documented in benchmarks/README.md); the numbers are not
checked against targets, only that every script runs end to end and records what it measured,
where (the machine, the load average at both ends) and its targets' figures.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
HAS_MPIEXEC = shutil.which("mpiexec") is not None or os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                                  "mpiexec"))
needs_mpiexec = pytest.mark.skipif(not HAS_MPIEXEC, reason="no mpiexec")


def _run(script, tmp_path, *extra, timeout=120):
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MPIFEDMETA_INJECT_FAILURE", None)
    r = subprocess.run([sys.executable, os.path.join(BENCH, f"{script}.py"), "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"wrote {out}" in r.stdout and "load average at start" in r.stdout      # common.finish's ending
    data = json.loads(out.read_text())
    assert data["benchmark"] == script and data["wall_s"] > 0
    m = data["machine"]
    for key in ("torch_version", "device", "cpu_count", "torch_threads", "date_utc", "git_commit"):
        assert key in m, key
    assert len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    assert data["rows"], "no measurements"
    return data


def _measured(target):
    """A target as the scripts record it: a figure (or why not), its limit and the verdict that follows."""
    assert {"target", "measured", "limit", "met", "fmt"} <= set(target)
    if target["measured"] is None:
        assert target["met"] is None and target["why"]
    else:
        assert target["met"] == (target["measured"] <= target["limit"] if target["at_most"]
                                 else target["measured"] >= target["limit"])
    return target["measured"]


def test_throughput_quick(tmp_path):
    d = _run("throughput", tmp_path, "--threads", "1")
    assert all(r["ok"] for r in d["agreement"])
    row = d["rows"][0]
    assert row["baseline_aps"] > 0 and row["vmap_aps"] > 0 and row["stacked_aps"] > 0 and row["auto_choice"]
    e2e = d["end_to_end"]
    assert e2e["rel_err_models"] < 1e-4 and e2e["baseline_aps"] > 0
    assert _measured(d["targets"]["e2e_speedup"]) == pytest.approx(e2e["stacked_aps"] / e2e["baseline_aps"])


def test_memory_quick(tmp_path):
    d = _run("memory", tmp_path, "--threads", "1")
    assert all(r.get("peak_mb", -1) >= 0 for r in d["rows"])
    assert os.path.exists(tmp_path / "memory.png")


def test_flops_quick(tmp_path):
    d = _run("flops", tmp_path, "--threads", "1")
    assert d["peak_reference"]["gflops_median"] > 0
    assert all(r["flops"] > 0 and r["gflops"] > 0 for r in d["rows"])


@needs_mpiexec
def test_scaling_quick(tmp_path):
    d = _run("scaling", tmp_path, "--no-probe", "--ranks", "2", timeout=180)
    row = d["rows"][0]
    assert row["P"] == 2 and row["round_time_median_s"] > 0 and row["bytes_allreduced"] > 0
    assert _measured(d["targets"]["allreduce_share"]) == pytest.approx(row["allreduce_share"])


def test_hvp_variants_quick(tmp_path):
    d = _run("hvp_variants", tmp_path, "--threads", "1")
    row = d["rows"][0]
    assert row["rel_err_vs_engine"]["vmap_rr"] < 1e-4 and row["engine_vmap_aps"] > 0


def test_roofline_quick(tmp_path):
    """Whole rounds through common.engine_rounds: time, profile, floors and the targets of every work."""
    d = _run("roofline", tmp_path, timeout=180)
    assert [r["work"] for r in d["rows"]] == ["peers-fedavg", "peers-fo", "mnist-exact"]
    for r in d["rows"]:
        assert r["round_ms"] > 0 and r["gemm_floor_ms"] > 0 and r["passes_per_meta_step"] > 0
        assert 0 < r["gemm_share"] < 1 and 0 < r["exact_sum_share"] < 1
        assert set(r["regions_ms"]) >= {"mpifedmeta.local_update", "mpifedmeta.exact_sum", "mpifedmeta.allreduce"}
        assert _measured(d["targets"][f"gemm_share_{r['work']}"]) == r["gemm_share"]
    assert _measured(d["targets"]["exact_sum_share"]) == max(r["exact_sum_share"] for r in d["rows"])


def test_busy_node_quick(tmp_path):
    """Four short quickstarts (idle/busy × default threads/all cores); a collapsed one is a timeout, not a failure."""
    d = _run("busy_node", tmp_path, "--timeout", "25", timeout=200)
    assert {(r["threads"], r["busy"]) for r in d["rows"]} == {("default", False), ("default", True),
                                                              (d["cores"], False), (d["cores"], True)}
    for r in d["rows"]:
        assert (r["training_s"] or 0) > 0 or r["timed_out_after_s"] == 25
    assert next(r for r in d["rows"] if r["threads"] == "default" and not r["busy"])["training_s"] > 0
    _measured(d["targets"]["busy_over_idle"])
    assert _measured(d["targets"]["idle_vs_before"]) is None       # 3 rounds: not the quickstart's 60


@needs_mpiexec
def test_peers_quick(tmp_path):
    """Every column runs (pfl only where it is installed, else the JSON says why) and the start-up check."""
    d = _run("peers", tmp_path, "--startup-runs", "1", timeout=420)
    rows = {r["system"]: r for r in d["rows"]}
    for system in ("mpifedmeta-2x1", "mpifedmeta-1xT", "loop-1xT"):
        r = rows[system]
        assert "error" not in r, r.get("error")
        assert r["s_per_round"] > 0 and r["startup_s"] > 0 and r["peak_rss_mib"] > 0
        assert len(r["round_times_s"]) == d["settings"]["rounds"]
    assert rows["mpifedmeta-2x1"]["processes"] == 2 and rows["mpifedmeta-2x1"]["threads"] == 1
    assert "train.threads=1" in rows["mpifedmeta-2x1"]["cmd"]
    target = d["targets"]["vs_pfl_nu1"]
    if "pfl-2x1" in rows:
        assert "error" not in rows["pfl-2x1"], rows["pfl-2x1"].get("error")
        assert rows["pfl-2x1"]["s_per_round"] > 0 and len(rows["pfl-2x1"]["worker_peak_rss_mib"]) == 2
        assert _measured(target) == pytest.approx(rows["pfl-2x1"]["s_per_round"] / rows["mpifedmeta-2x1"]["s_per_round"])
    else:
        assert "pfl" in d["notes"]["pfl-2x1"] and _measured(target) is None
    assert d["startup"]["to_round1_start_s"] > 0


@needs_mpiexec
def test_population_quick(tmp_path):
    d = _run("population", tmp_path, timeout=300)
    assert all(r["ok"] for r in d["rows"]) and {r["N"] for r in d["rows"]} == {1000, 100000}
    assert all(r["round_median_s"] > 0 and r["peak_rss_mb"] > 0 and r["startup_s"] >= 0 for r in d["rows"])
    assert os.path.exists(tmp_path / "population.png")


def test_targets_table(tmp_path):
    """targets.py turns the scripts' JSON into the README's table: one row per target, --quick runs not judged."""
    results = tmp_path / "results"
    results.mkdir()
    target = {"target": "t", "measured": 7.0, "limit": 6.0, "at_most": False, "met": True, "fmt": "{:.2f}×",
              "detail": "d"}
    machine = {"date_utc": "2026-01-01T00:00:00+00:00", "git_commit": "abc1234", "loadavg_start": [0.5, 0.5, 0.5]}
    (results / "peers.json").write_text(json.dumps({"machine": machine, "quick": False,
                                                    "targets": {"vs_pfl_nu0": target}}))
    (results / "roofline.json").write_text(json.dumps({"machine": machine, "quick": True,
                                                       "targets": {"exact_sum_share": target}}))
    readme = tmp_path / "README.md"
    (results / "peers.txt").write_text("ms/round 14.4\n")      # what quiet_run.sh kept of peers.py's output
    readme.write_text("head\n<!-- targets:begin -->\nold\n<!-- targets:end -->\ntail\n"
                      "<!-- peers:begin -->\nold\n<!-- peers:end -->\n<!-- roofline:begin -->\nkept\n<!-- roofline:end -->\n")
    r = subprocess.run([sys.executable, os.path.join(BENCH, "targets.py"), "--results", str(results),
                        "--write-readme", str(readme)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [line for line in readme.read_text().splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 10
    assert "7.00× (d) | **met** | `" in lines[1] and "abc1234, load 0.5" in lines[1]
    assert "not judged (a --quick run)" in next(line for line in lines if "exact sum" in line)
    assert "not measured (no `results/busy_node.json`)" in lines[-1]
    text = readme.read_text()
    assert text.startswith("head\n") and "<!-- targets:end -->\ntail\n" in text
    assert "<!-- peers:begin -->\n`python benchmarks/peers.py` printed:\n\n```\nms/round 14.4\n```\n<!-- peers:end -->" in text
    assert "<!-- roofline:begin -->\nkept\n<!-- roofline:end -->" in text    # no roofline.txt: left as it was


def test_algorithms_benchmark_quick(tmp_path):
    """Every algorithm on both sides (mpifedmeta's rounds in-process, the PFLlib-style per-agent loop):
    the loop on the engine's batches gives the engine's global model, times and losses recorded, the targets."""
    import math
    d = _run("algorithms", tmp_path, timeout=180)
    assert [r["algorithm"] for r in d["rows"]] == ["fedavg", "perfedavg-fo", "pfedme", "ditto", "fedrep"]
    for r in d["rows"]:
        assert r["engine_s_per_round"] > 0 and r["loop_s_per_round"] > 0 and r["rounds_timed"] >= 3
        assert r["agreement"]["rel_err_w"] < 1e-4, (r["algorithm"], r["agreement"])
        assert math.isfinite(r["engine_loss"]) and math.isfinite(r["loop_loss"])
        assert _measured(d["targets"][f"vs_loop_{r['algorithm']}"]) == pytest.approx(
            r["loop_s_per_round"] / r["engine_s_per_round"])


def test_privacy_benchmark_quick(tmp_path):
    """DP-FedAvg (clip + noise) against the same run without it, interleaved, on every work: both timed, the
    DP rounds spent time in the clip and in the noise, the profiler saw the clip region, the accountants timed,
    the targets."""
    import math
    d = _run("privacy", tmp_path, timeout=300)
    assert [r["work"] for r in d["rows"]] == ["digits-nu0", "digits-fo", "virtual-nu0"]
    for r in d["rows"]:
        assert r["off_s_per_round"] > 0 and r["dp_s_per_round"] > 0 and r["rounds_timed"] >= 3
        assert r["agent_chunk"] is not None and r["clip_calls_per_round"] >= 1   # both variants: the same chunk
        assert len(r["clip_s"]) == len(r["noise_s"]) == r["rounds_timed"]
        assert min(r["clip_s"]) > 0 and min(r["noise_s"]) > 0          # every timed DP round clipped and drew noise
        assert r["profiled_regions_ms"]["mpifedmeta.clip"] > 0
        assert r["parts_share"] == pytest.approx(r["clip_share"] + r["noise_share"])
        for kind in ("rdp-poisson", "rdp-fixed", "pld-poisson"):
            acc = r["accountant"][kind]
            assert acc["median_s"] > 0 and math.isfinite(acc["epsilon"]) and acc["epsilon"] > 0, (kind, acc)
            assert isinstance(acc["calibrated_z"], float) and acc["calibrated_z"] > 0, (kind, acc)
        assert _measured(d["targets"][f"overhead_{r['work']}"]) == pytest.approx(r["overhead_paired"])

#!/usr/bin/env python
"""Issue 11's performance targets as a Markdown table, read from the benchmarks' JSON results.

Nothing is measured or typed in here: every figure comes from benchmarks/results/{peers,throughput,
flops}.json as the scripts wrote them (with the load average and commit of the run), so the table in
benchmarks/README.md can be regenerated after a re-run:

    python benchmarks/peers.py && python benchmarks/throughput.py && python benchmarks/flops.py
    python benchmarks/targets.py            # prints the table
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(name: str, folder: str) -> dict | None:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def source(name: str, d: dict) -> str:
    m = d.get("machine", {})
    load = m.get("loadavg_start") or [float("nan")]
    return f"`results/{name}.json` ({m.get('date_utc', '?')[:16]}, {m.get('git_commit', '?')}, load {load[0]:.1f})"


def verdict(met) -> str:
    return "not measured" if met is None else ("**MET**" if met else "**MISSED**")


def rows(folder: str) -> list[tuple[str, str, str, str]]:
    out = []
    peers, thr, flops = load("peers", folder), load("throughput", folder), load("flops", folder)
    for nu, name in ((0, "FedAvg (ν = 0)"), (1, "first-order Per-FedAvg (ν = 1 fo)")):
        t = (peers or {}).get("targets", {}).get(f"vs_pfl_nu{nu}")
        if t is None:
            out.append((f"per round ≥ 5× faster than pfl-research, {name}", "–", "not measured", "`peers.py`"))
            continue
        fig = (f"{t['measured']:.2f}× ({t['system']})" if t.get("measured") is not None
               else f"– ({t.get('why', '')})")
        out.append((f"per round ≥ 5× faster than pfl-research, {name}", fig, verdict(t.get("met")), source("peers", peers)))
    t = (thr or {}).get("targets", {}).get("e2e_speedup")
    if t:
        fig = f"{t['measured']:.2f}× ({t['default_strategy']})" if t.get("measured") is not None else "–"
        if t.get("best_strategy") and t["best_strategy"] != t.get("default_strategy"):
            fig += f"; best {t['best']:.2f}× ({t['best_strategy']})"
        out.append(("exact ν = 3, MLP, 32 agents, τ = 5: ≥ 5× the per-agent autograd loop", fig, verdict(t.get("met")),
                    source("throughput", thr)))
    t = (flops or {}).get("targets", {}).get("exact_nu3_mlp_32")
    if t:
        out.append(("exact ν = 3 meta-step, MLP 784-80-60-10, 32 agents: ≥ 50% of the measured sgemm rate",
                    f"{t['measured']:.1%} ({t['strategy']}; sgemm {flops['peak_reference']['gflops_median']:.1f} GFLOP/s)",
                    verdict(t.get("met")), source("flops", flops)))
    t = (thr or {}).get("targets", {}).get("cnn_auto_never_slower")
    if t:
        fig = f"worst {t['measured_min_auto_vs_baseline']:.2f}× the per-agent loop ({t['at']}, auto → {t['auto_choice']})"
        if t.get("measured_min_auto_vs_engine_loop") is not None:
            fig += f"; worst {t['measured_min_auto_vs_engine_loop']:.2f}× the engine's own `loop` backend"
        out.append(("CNN never slower than the loop under `auto`", fig, verdict(t.get("met")), source("throughput", thr)))
    t = (peers or {}).get("targets", {}).get("startup")
    if t:
        out.append(("start-up < 3 s (`mpifedmeta run configs/quickstart.toml --set train.rounds=1`)",
                    f"round 1 starts {t['measured']:.2f} s, ends {t['round1_end']:.2f} s after launch",
                    verdict(t.get("met")), source("peers", peers)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=RESULTS, help="folder of the JSON files (default benchmarks/results)")
    a = ap.parse_args(argv)
    print("| target (issue 11) | measured | verdict | source |")
    print("|---|---|---|---|")
    for r in rows(a.results):
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

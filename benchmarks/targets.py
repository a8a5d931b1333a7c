#!/usr/bin/env python
"""The performance targets as a Markdown table, read from the benchmarks' JSON results.

Nothing is measured or typed in here: every figure and verdict comes from the ``targets`` that
peers.py, throughput.py, roofline.py and busy_node.py wrote into benchmarks/results/*.json (with
the date, commit and load average of the run); a --quick run's figures are shown but not judged.

    bash benchmarks/quiet_run.sh                  # the four scripts, their output kept in results/*.txt
    python benchmarks/targets.py                  # prints the table
    python benchmarks/targets.py --write-readme   # and puts it between the markers of benchmarks/README.md

--write-readme also copies what peers.py, throughput.py and roofline.py printed in that run
(results/NAME.txt, written by quiet_run.sh) between the ``<!-- NAME:begin -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")
PRINTED = ("roofline", "peers", "throughput")   # scripts whose printed tables the README quotes

#: (the target as stated, the JSON it is read from, its key in that JSON's "targets")
TARGETS = (
    ("per round ≥ 6× pfl-research (2 workers), FedAvg (ν = 0); mpifedmeta on 2 ranks × 1 thread",
     "peers", "vs_pfl_nu0"),
    ("per round ≥ 6× pfl-research (2 workers), first-order Per-FedAvg (ν = 1 fo); mpifedmeta on 2 ranks × 1 thread",
     "peers", "vs_pfl_nu1"),
    ("GEMM ≥ 50% of the aten op time, whole rounds of the peers work, ν = 0", "roofline", "gemm_share_peers-fedavg"),
    ("GEMM ≥ 50% of the aten op time, whole rounds of the peers work, ν = 1 fo", "roofline", "gemm_share_peers-fo"),
    ("GEMM ≥ 65% of the aten op time, 784 MLP at ν = 3 exact", "roofline", "gemm_share_mnist-exact"),
    ("784 MLP, ν = 3 exact, 32 agents, τ = 5: ≥ 2.5× `benchmarks/baseline.py` end to end (the default strategy)",
     "throughput", "e2e_speedup"),
    ("exact sum ≤ 5% of a round (the work where it is largest)", "roofline", "exact_sum_share"),
    ("CNN ≥ 1.0× the loop (`baseline.py`) under `auto` (its worst CNN row)", "throughput", "cnn_auto"),
    ("the quickstart beside one other CPU-bound process ≤ 1.3× its idle time (default threads)",
     "busy_node", "busy_over_idle"),
    ("the quickstart idle ≤ 1.1× the 3.6 s of training reported before the current engine (default threads, "
     "60 rounds)", "busy_node", "idle_vs_before"),
)


def load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def source(path: str, d: dict) -> str:
    m = d["machine"]
    where = os.path.relpath(path, HERE)
    return f"`{where}` ({m['date_utc'][:16]} UTC, {m['git_commit']}, load {m['loadavg_start'][0]:.1f})"


def row(text: str, name: str, key: str, path: str, d: dict | None) -> tuple[str, str, str, str]:
    t = (d or {}).get("targets", {}).get(key)
    if t is None or "fmt" not in t:
        why = (f"no `results/{name}.json`" if d is None else f"`{key}` not in `results/{name}.json`" if t is None
               else f"`results/{name}.json` is from an older version of `{name}.py`")
        return text, "–", f"not measured ({why})", f"`{name}.py`"
    figure = "–" if t["measured"] is None else t["fmt"].format(t["measured"])
    figure += f" ({t['detail']})" if t.get("detail") else (f" ({t['why']})" if t.get("why") else "")
    if d.get("quick"):
        verdict = "not judged (a --quick run)"
    else:
        verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
    return text, figure, verdict, source(path, d)


def markdown(folder: str) -> str:
    cache = {}
    lines = ["| target | measured | verdict | source |", "|---|---|---|---|"]
    for text, name, key in TARGETS:
        path = os.path.join(folder, f"{name}.json")
        if name not in cache:
            cache[name] = load(path)
        lines.append("| " + " | ".join(row(text, name, key, path, cache[name])) + " |")
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str, path: str) -> str:
    """``text`` with ``body`` between its ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def printed(folder: str, name: str) -> str | None:
    """What NAME.py printed in the quiet run (results/NAME.txt), fenced, or None if not kept."""
    path = os.path.join(folder, f"{name}.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f"`python benchmarks/{name}.py` printed:\n\n```\n{f.read().rstrip()}\n```"


def write_readme(path: str, table: str, folder: str) -> None:
    with open(path) as f:
        text = f.read()
    text = replace_section(text, "targets", table, path)
    for name in PRINTED:
        body = printed(folder, name)
        if body is not None:
            text = replace_section(text, name, body, path)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=RESULTS, help="folder of the JSON files (default benchmarks/results)")
    ap.add_argument("--write-readme", nargs="?", const=README, default=None, metavar="PATH",
                    help="also write the table (and the kept outputs of the quiet run) between the markers of PATH "
                         "(default benchmarks/README.md)")
    a = ap.parse_args(argv)
    table = markdown(a.results)
    print(table)
    if a.write_readme:
        write_readme(a.write_readme, table, a.results)
        print(f"\nwrote the table into {a.write_readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""A run on a node that is not idle: the quickstart alone, and beside ONE other CPU-bound process.

Four launches of ``mpifedmeta run configs/quickstart.toml`` (60 rounds), each timed by the
"s of training" of its closing line (and its wall time):

    idle, default threads      the default: one torch thread per rank (train.threads = 0)
    idle, all cores            train.threads = the machine's cores (the old default for one rank)
    busy, default threads      the same beside a Python busy loop
    busy, all cores

The busy loop is started before the run and killed after it. A run that has not finished after
``--timeout`` seconds is stopped and reported as such (OpenMP threads that spin-wait for a peer
sharing its core can make a run tens of times slower). Prints the table and the ratios busy/idle;
writes benchmarks/results/busy_node.json.

    python benchmarks/busy_node.py               # ~1 minute on 2 cores when nothing collapses
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import common

BUSY_LOOP = "while True: pass"


def run_quickstart(threads: int | None, busy: bool, timeout: float, rounds: int) -> dict:
    """One quickstart launch; threads None = the default. Returns its times (None when it timed out)."""
    out = tempfile.mkdtemp(prefix="mpifedmeta-busy-")
    exe = os.path.join(os.path.dirname(sys.executable), "mpifedmeta")
    cmd = [exe if os.path.exists(exe) else sys.executable, "run", os.path.join(common.REPO, "configs", "quickstart.toml"),
           "--set", f"output.dir={out}/run", "--set", f"train.rounds={rounds}"]
    if threads is not None:
        cmd += ["--set", f"train.threads={threads}"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"threads": threads or "default", "busy": busy, "training_s": None, "wall_s": None,
                    "timed_out_after_s": timeout}
        wall = time.perf_counter() - t0
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    m = re.search(r"done: \d+ rounds, ([0-9.]+) s of training", p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-500:]}")
    return {"threads": threads or "default", "busy": busy, "training_s": float(m.group(1)), "wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a run counts as collapsed")
    ap.add_argument("--quick", action="store_true", help="10 rounds, 60 s timeout (smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.timeout = 10, 60.0
    info = common.machine_info(common.pick_device("cpu"))
    info["loadavg_start"] = os.getloadavg()
    t_all = time.perf_counter()
    cores = os.cpu_count() or 1
    rows = [run_quickstart(threads, busy, args.timeout, args.rounds)
            for busy in (False, True) for threads in (None, cores)]
    by = {(r["threads"], r["busy"]): r for r in rows}
    for threads in ("default", cores):
        idle, busy = by[(threads, False)]["training_s"], by[(threads, True)]["training_s"]
        ratio = busy / idle if idle and busy else None
        for r in (by[(threads, False)], by[(threads, True)]):
            r["busy_over_idle"] = ratio
    print(f"quickstart ({args.rounds} rounds), {cores} cores, load average at start {info['loadavg_start'][0]:.2f}")
    print(common.table(rows, [("threads", "torch threads", ""), ("busy", "beside a busy loop", ""),
                              ("training_s", "s of training", "{:.2f}"), ("wall_s", "wall s", "{:.2f}"),
                              ("busy_over_idle", "busy / idle", "{:.2f}"), ("timed_out_after_s", "timed out", "{:.0f}")]))
    default_idle = by[("default", False)]["training_s"]
    all_idle = by[(cores, False)]["training_s"]
    targets = {"busy_within_1.3x": by[("default", True)].get("busy_over_idle"),
               "idle_default_vs_all_cores": default_idle / all_idle if default_idle and all_idle else None}
    print(f"default threads: busy/idle = {targets['busy_within_1.3x'] or float('nan'):.2f} (target <= 1.3); "
          f"idle default vs all cores = {targets['idle_default_vs_all_cores'] or float('nan'):.2f}")
    common.finish("busy_node", args.out, info, t_all, {"rounds": args.rounds, "rows": rows, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())

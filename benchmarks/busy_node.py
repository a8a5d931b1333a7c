#!/usr/bin/env python
"""A run on a node that is not idle: the quickstart alone, and beside ONE other CPU-bound process.

Four launches of ``mpifedmeta run configs/quickstart.toml`` (its 60 rounds by default), each timed
by its seconds of training (``train/wall_time`` of the last round in metrics.h5, which the closing
line "done: ... s of training" rounds) and its wall time:

    idle, default threads      the default: one torch thread per rank (train.threads = 0)
    idle, all cores            train.threads = the machine's cores
    busy, default threads      the same beside a Python busy loop
    busy, all cores

The busy loop is started before the run and killed after it. A run that has not finished after
``--timeout`` seconds is stopped and reported as such (OpenMP threads that spin-wait for a peer
sharing its core can make a run tens of times slower). Prints the table and the ratios busy/idle;
writes benchmarks/results/busy_node.json.

Targets (printed and in the JSON), default threads: busy <= 1.3× idle; idle <= 1.1× the 3.6 s of
training the quickstart's 60 rounds took on this machine before the current engine (compared only
when the run has the quickstart's 60 rounds).

    python benchmarks/busy_node.py               # ~1 minute on 2 cores when nothing collapses
    python benchmarks/busy_node.py --quick       # 3 rounds, 30 s timeout (smoke test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import common

BUSY_LOOP = "while True: pass"
QUICKSTART_ROUNDS = 60
IDLE_BEFORE_S = 3.6        # s of training of the quickstart (60 rounds, idle) reported before the current engine
IDLE_TARGET = 1.1          # idle, default threads: at most this × IDLE_BEFORE_S
BUSY_TARGET = 1.3          # beside one busy process: at most this × idle


def run_quickstart(threads: int | None, busy: bool, timeout: float, rounds: int) -> dict:
    """One quickstart launch; threads None = the default. Returns its times (None when it timed out)."""
    out = tempfile.mkdtemp(prefix="mpifedmeta-busy-")
    cmd = common.mpifedmeta_cmd() + ["run", os.path.join(common.REPO, "configs", "quickstart.toml"),
                                     "--set", f"output.dir={out}/run", "--set", f"train.rounds={rounds}"]
    if threads is not None:
        cmd += ["--set", f"train.threads={threads}"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    row = {"threads": threads or "default", "busy": busy, "training_s": None, "wall_s": None}
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            shutil.rmtree(out, ignore_errors=True)
            return dict(row, timed_out_after_s=timeout)
        row["wall_s"] = time.perf_counter() - t0
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-500:]}")
    training_s = float(common.read_run(f"{out}/run").train["wall_time"][-1])
    shutil.rmtree(out, ignore_errors=True)
    return dict(row, training_s=training_s)


def assess(by: dict, rounds: int) -> dict:
    idle, busy = by[("default", False)]["training_s"], by[("default", True)]["training_s"]
    ratio = busy / idle if idle and busy else None
    full = rounds == QUICKSTART_ROUNDS
    return {
        "busy_over_idle": common.target(f"quickstart beside one CPU-bound process <= {BUSY_TARGET}x its idle time "
                                        "(default threads)", ratio, BUSY_TARGET, at_most=True, fmt="{:.2f}×",
                                        why=None if ratio else "a run timed out",
                                        detail=f"{busy:.2f} vs {idle:.2f} s of training" if ratio else None),
        "idle_vs_before": common.target(
            f"quickstart idle (default threads) <= {IDLE_TARGET}x the {IDLE_BEFORE_S} s of training reported before "
            "the current engine", idle / IDLE_BEFORE_S if idle and full else None, IDLE_TARGET, at_most=True,
            fmt="{:.2f}×", why=None if full else f"{rounds} rounds, not the quickstart's {QUICKSTART_ROUNDS}",
            detail=f"{idle:.2f} vs {IDLE_BEFORE_S} s of training" if idle and full else None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=QUICKSTART_ROUNDS)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a run counts as collapsed")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 30 s timeout (smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.timeout = 3, min(args.timeout, 30.0)
    info = common.machine_info(common.pick_device("cpu"))
    t_all = time.perf_counter()
    cores = common.physical_cores()
    rows = [run_quickstart(threads, busy, args.timeout, args.rounds)
            for busy in (False, True) for threads in (None, cores)]
    by = {(r["threads"], r["busy"]): r for r in rows}
    for threads in ("default", cores):
        idle, busy = by[(threads, False)]["training_s"], by[(threads, True)]["training_s"]
        for r in (by[(threads, False)], by[(threads, True)]):
            r["busy_over_idle"] = busy / idle if idle and busy else None
    print(f"quickstart ({args.rounds} rounds), {cores} cores, load average at start {info['loadavg_start'][0]:.2f}")
    print(common.table(rows, [("threads", "torch threads", ""), ("busy", "beside a busy loop", ""),
                              ("training_s", "s of training", "{:.2f}"), ("wall_s", "wall s", "{:.2f}"),
                              ("busy_over_idle", "busy / idle", "{:.2f}"), ("timed_out_after_s", "timed out", "{:.0f}")]))
    targets = assess(by, args.rounds)
    common.print_targets(targets, args.quick)
    common.finish("busy_node", args.out, info, t_all, {"rounds": args.rounds, "quick": args.quick, "cores": cores,
                                                       "rows": rows, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())

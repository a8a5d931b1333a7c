"""Cost of a population vs its size N: start-up, seconds per round and peak memory at a fixed cohort.

For every point (population kind, N, cohort K, ranks P) a fresh ``mpiexec -n P`` process sets a run
up in-process exactly as ``mpifedmeta run`` does (the population, the model, the evaluated agents),
then runs its rounds as the training loop runs them (cohort, weights, the rank's built share of the
cohort, the local round, the Allreduce, the server step) without file output, and one evaluation —
all through ``common.engine_rounds``. Measured per point: start-up (the set-up's seconds; the
interpreter, the imports and the strategy choice are reported apart), the median seconds per round
(the first round is a warm-up; the slowest rank per round), the evaluation's seconds and the peak
resident memory of each rank (``ru_maxrss``).

Populations: ``synthetic`` (FedProx Synthetic(1, 1), samples per agent capped at 1000) and
``virtual`` (virtual-shards agents over MNIST-5k, 50 samples and 2 classes each). Model: multinomial
logistic regression, ν = 1 exact, τ = 5 local steps, batch 10, 100 evaluated agents.

Targets: round time and peak memory at N = 10^6 within 10% of N = 10^3 at the same
cohort; start-up at N = 10^6 under 5 s; N = 10^7 with a cohort of 1000 runs.

    python benchmarks/population.py                 # the default grid (~4 minutes on 2 cores)
    python benchmarks/population.py --rounds 10     # steadier medians (default 5)
    python benchmarks/population.py --quick         # seconds: the smoke setting
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

KINDS = {
    "synthetic": ["data.dataset=\"synthetic\"", "data.synthetic_alpha=1.0", "data.synthetic_beta=1.0",
                  "data.synthetic_max_samples=1000"],
    "virtual": ["data.dataset=\"mnist5k\"", "data.partition=\"virtual-shards\"", "data.samples_per_agent=50",
                "data.classes_per_agent=2"],
}


def overrides(kind: str, N: int, K: int, rounds: int, eval_agents: int) -> list[str]:
    return KINDS[kind] + [f"data.num_agents={N}", "data.holdout_agents=0", f"train.agents_per_round={K}",
                          f"train.rounds={rounds}", "train.local_steps=5", "train.nu=1", "train.batch_size=10",
                          "train.alpha=0.05", "train.beta=0.05", "model.name=\"linear\"",
                          f"eval.agents={min(eval_agents, N)}", "eval.finetune_steps=[0,1]",
                          "output.dir=\"/nonexistent/never-written\""]


# --------------------------------------------------------------------------- worker (under mpiexec)
def worker(args) -> None:
    t_py = time.perf_counter() - T_START
    t0 = time.perf_counter()
    import common
    from mpifedmeta.parallel import dist
    t_import = time.perf_counter() - t0
    world = dist.init_world()
    run = common.engine_rounds(json.loads(args.worker), world)
    w, times = run.w0, []
    for r in range(1, run.cfg.train.rounds + 1):
        dist.barrier(world)
        t0 = time.perf_counter()
        w = run.step(w, r)
        times.append(time.perf_counter() - t0)
    dist.barrier(world)
    t0 = time.perf_counter()
    run.evaluate(w, run.cfg.train.rounds)
    t_eval = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    every = dist.allgather(world, {"rss_mb": rss_mb, "setup_s": run.setup_s, "strategy_s": run.strategy_s,
                                   "round_s": times})
    if world.is_root:
        timed = [max(e["round_s"][i] for e in every) for i in range(len(times))][1:] or times
        print("RESULT " + json.dumps({
            "startup_s": max(e["setup_s"] for e in every), "strategy_s": max(e["strategy_s"] for e in every),
            "python_start_s": t_py, "import_s": t_import, "strategy": run.strategy,
            "round_median_s": statistics.median(timed), "round_min_s": min(timed), "round_s": timed,
            "eval_s": t_eval, "peak_rss_mb_per_rank": [e["rss_mb"] for e in every],
            "peak_rss_mb": max(e["rss_mb"] for e in every)}), flush=True)


# --------------------------------------------------------------------------- driver
def run_point(args, kind: str, N: int, K: int, P: int) -> dict:
    sets = overrides(kind, N, K, args.rounds, args.eval_agents)
    cmd = shlex.split(args.launcher.format(P=P)) + [sys.executable, os.path.abspath(__file__), "--worker",
                                                    json.dumps(sets)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    row = {"kind": kind, "N": N, "cohort": K, "P": P, "load_before": os.getloadavg()[0]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**row, "ok": False, "error": f"timeout after {args.timeout} s"}
    row["process_s"] = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**row, "ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {**row, "ok": True, **json.loads(lines[-1][7:])}


def assess(rows: list[dict]) -> list[dict]:
    """The targets, met or missed, with the figures."""
    by = {(r["kind"], r["N"], r["cohort"], r["P"]): r for r in rows if r.get("ok")}
    out = []
    for (kind, N, K, P), big in sorted(by.items()):
        small = by.get((kind, 10**3, K, P))
        if N != 10**6 or small is None:
            continue
        for what, key in (("round time", "round_median_s"), ("peak memory", "peak_rss_mb")):
            ratio = big[key] / small[key]
            out.append({"target": f"{what} N=1e6 within 10% of N=1e3", "kind": kind, "cohort": K, "P": P,
                        "N=1e3": small[key], "N=1e6": big[key], "ratio": ratio, "met": ratio <= 1.10})
        out.append({"target": "start-up at N=1e6 < 5 s", "kind": kind, "cohort": K, "P": P,
                    "N=1e6": big["startup_s"], "met": big["startup_s"] < 5.0})
    for (kind, N, K, P), r in sorted(by.items()):
        if N == 10**7 and K == 1000:
            out.append({"target": "N=1e7 with cohort 1000 runs", "kind": kind, "cohort": K, "P": P,
                        "peak_rss_mb": r["peak_rss_mb"], "round_median_s": r["round_median_s"], "met": True})
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = sorted({(r["kind"], r["cohort"], r["P"]) for r in rows if r.get("ok")})
    for kind, K, P in series:
        pts = sorted((r["N"], r) for r in rows if r.get("ok") and (r["kind"], r["cohort"], r["P"]) == (kind, K, P))
        Ns = [n for n, _ in pts]
        style = dict(marker="o" if kind == "synthetic" else "s", linestyle="-" if P == 1 else "--",
                     label=f"{kind}, K={K}, P={P}")
        axes[0].plot(Ns, [r["round_median_s"] for _, r in pts], **style)
        axes[1].plot(Ns, [r["peak_rss_mb"] for _, r in pts], **style)
        axes[2].plot(Ns, [r["startup_s"] for _, r in pts], **style)
    for ax, title in zip(axes, ("seconds per round (median)", "peak RSS per rank (MB)", "start-up: the set-up (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("agents in the population N")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(bottom=0)
    axes[2].axhline(5.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle("cost follows the cohort, not N (mpifedmeta, benchmarks/population.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke setting: N = 1e3, 1e5; cohort 20; 1 rank; 2 rounds")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6, 1e7], help="population sizes N")
    ap.add_argument("--cohorts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="rounds per point; the first is a warm-up (default 5)")
    ap.add_argument("--eval-agents", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank (default 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per point")
    ap.add_argument("--launcher", default=None, help='MPI launch command with {P} (default "mpiexec -n {P}")')
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/population.json); PNG alongside")
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    if args.quick:
        args.sizes, args.cohorts, args.ranks, args.rounds, args.eval_agents = [1e3, 1e5], [20], [1], 2, 20
    import common
    args.launcher = args.launcher or common.default_launcher()
    info = common.machine_info(common.pick_device("cpu"))
    rows = []
    t_all = time.perf_counter()
    print(f"{'kind':>9} {'N':>9} {'K':>5} {'P':>2} {'start-up s':>10} {'s/round':>8} {'eval s':>7} {'RSS MB':>7} {'load':>5}")
    for kind in args.kinds:
        for K in args.cohorts:
            for N in (int(n) for n in args.sizes):
                if K > N:
                    continue
                for P in args.ranks:
                    r = run_point(args, kind, N, K, P)
                    rows.append(r)
                    if r["ok"]:
                        print(f"{kind:>9} {N:>9} {K:>5} {P:>2} {r['startup_s']:>10.3f} {r['round_median_s']:>8.3f} "
                              f"{r['eval_s']:>7.2f} {r['peak_rss_mb']:>7.0f} {r['load_before']:>5.1f}", flush=True)
                    else:
                        print(f"{kind:>9} {N:>9} {K:>5} {P:>2} FAILED: {r['error']}", flush=True)
    targets = assess(rows)
    print("\ntargets")
    for t in targets:
        figs = ", ".join(f"{k} {v:.3g}" for k, v in t.items() if isinstance(v, float))
        print(f"  {'MET   ' if t['met'] else 'MISSED'} {t['target']} [{t['kind']}, K={t['cohort']}, P={t['P']}]: {figs}")
    png = os.path.splitext(common.out_path(args.out, "population"))[0] + ".png"
    if any(r.get("ok") for r in rows):
        plot(rows, png)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    common.finish("population", args.out, info, t_all, {"quick": args.quick, "settings": settings, "rows": rows,
                                                         "targets": targets, "plot": os.path.basename(png)})
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
